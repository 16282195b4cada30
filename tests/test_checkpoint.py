"""Run checkpoints: restore onto a different mesh, no rewriting of finished steps; remat invariance."""

import functools

import jax
import numpy as np
import pytest

from conftest import CONFIGS
from r1jax.checkpoint import RunCheckpointer, config_differences
from r1jax.config import MeshConfig, load_config
from r1jax.errors import CheckpointError
from r1jax.sharding import make_mesh
from r1jax.train.sft import sft_step
from r1jax.stages.start import _with_shardings
from r1jax.train.state import abstract_train_state, init_train_state, make_context, train_state_shardings
from test_sft import cfg_of, packed_batch


def test_restore_onto_a_different_mesh_and_never_rewrite(tmp_path, devices8):
    cfg = cfg_of()
    ctx = make_context(cfg)
    mesh_a = make_mesh(MeshConfig(data=2, fsdp=2, expert=2, tensor=1), devices8, cfg.model)
    mesh_b = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2), devices8, cfg.model)
    state = init_train_state(ctx, jax.random.key(0), mesh_a)
    ck = RunCheckpointer(tmp_path / "run", every=1, keep=3, async_save=True)
    assert ck.save(7, state, {"num_shards": 1, "shards": {"0": {"x": 1}}}, cfg, {"tokenizer.model": b"abc"})
    ck.wait()
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "7").rglob("*") if p.is_file()}
    assert not ck.save(7, state, {}, cfg, {}, force=True)  # a finished step is never written again
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "7").rglob("*") if p.is_file()} == files
    target = _with_shardings(abstract_train_state(ctx), train_state_shardings(ctx, mesh_b))
    restored, data, tok = ck.restore(7, target)
    assert data["shards"]["0"] == {"x": 1} and tok == {"tokenizer.model": b"abc"}
    for a, b, t in zip(jax.tree.leaves(state), jax.tree.leaves(restored), jax.tree.leaves(target)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding.is_equivalent_to(t.sharding, b.ndim)
    wq = restored.params["moe_blocks"]["attn"]["wq_b"].get_value()
    assert "tensor" in str(wq.sharding.spec)  # laid out for mesh B, not mesh A
    # a different model does not fit: one message naming the checkpoint
    other = make_context(cfg_of("model.d_ff=96"))
    bad = _with_shardings(abstract_train_state(other), train_state_shardings(other, mesh_b))
    with pytest.raises(CheckpointError, match="does not fit"):
        ck.restore(7, bad)
    ck.close()


def test_config_differences_ignore_what_may_change():
    a = cfg_of()
    b = load_config(CONFIGS / "models" / "tiny_v3.yaml",
                    ["train.batch_size=8", "train.seq_len=32", "optimizer.lr=1e-2", "optimizer.warmup_steps=0",
                     "train.steps=500", "model.n_layers=2", "mesh.fsdp=4", "train.log_every=3"])
    import json

    from r1jax.config import to_dict

    saved = json.loads(json.dumps(to_dict(a)))
    assert config_differences(saved, b) == []
    c = cfg_of("optimizer.lr=5e-3")
    assert [d[0] for d in config_differences(saved, c)] == ["optimizer.lr"]


def test_remat_does_not_change_the_step():
    rng = np.random.default_rng(3)
    batch = packed_batch(rng, 8, 32, 512)
    out = {}
    for remat in ("none", "full", "dots"):
        cfg = cfg_of(f"model.remat={remat}", "optimizer.lr=1e-4")
        ctx = make_context(cfg)
        state = init_train_state(ctx, jax.random.key(0))
        state, m = jax.jit(functools.partial(sft_step, ctx=ctx))(state, batch, jax.random.key(0))
        out[remat] = (float(m["loss"]), float(m["grad_norm"]), [np.asarray(x) for x in jax.tree.leaves(state.params)])
    for remat in ("full", "dots"):
        assert abs(out[remat][0] - out["none"][0]) < 1e-6 and abs(out[remat][1] - out["none"][1]) < 1e-5
        for a, b in zip(out[remat][2], out["none"][2]):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
