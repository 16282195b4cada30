"""Run checkpoints: restore onto a different mesh, no rewriting of finished steps; remat invariance;
integrity (manifests, damaged steps reported and skipped, hand-off lookups); logs after a resume."""

import functools
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import CONFIGS
from r1jax.checkpoint import (MANIFEST, RunCheckpointer, config_differences, find_stage_checkpoint, restore_params,
                              save_params, sealed)
from r1jax.config import ConfigError, MeshConfig, load_config
from r1jax.errors import CheckpointDamaged, CheckpointError
from r1jax.models import abstract_model
from r1jax.sharding import make_mesh
from r1jax.stages.loop import run_loop
from tensorboardX.proto.event_pb2 import Event, SessionLog
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


# ------------------------------------------------------ integrity: manifests, damage, hand-off ------

def tiny_state(scale: float) -> dict:
    """A small TrainState-like tree (the checkpointer does not care which tree it saves)."""
    return {"step": jnp.int32(scale), "params": {"w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64) * scale,
                                                  "b": jnp.full((7,), scale, jnp.float32)}}


def target_of(tree) -> dict:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), tree)


def digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def two_steps(tmp_path):
    """A run directory with steps 4 and 8 (async saves), each sealed."""
    cfg = load_config(CONFIGS / "models" / "tiny_qwen2.yaml")
    ck = RunCheckpointer(tmp_path / "run", every=1, keep=5, async_save=True)
    for step in (4, 8):
        assert ck.save(step, tiny_state(step), {"shards": {"0": {"at": step}}}, cfg, {"tokenizer.model": b"tok"})
    ck.close()
    return tmp_path / "run", cfg


def largest_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_each_step_is_sealed_once_its_async_save_is_complete(two_steps):
    run, _ = two_steps
    for step in (4, 8):
        d = run / str(step)
        manifest = json.loads((d / f"{MANIFEST}.0.json").read_text())
        on_disk = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and MANIFEST not in p.name}
        assert set(manifest["files"]) == on_disk and any(f.startswith("state/ocdbt.process_0/") for f in on_disk)
        for rel, f in manifest["files"].items():
            data = (d / rel).read_bytes()
            assert f == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
        assert sealed(d)


DAMAGES = {  # name: (damage the step directory, the file the report must name)
    "truncated data file": (lambda d: os.truncate(largest_file(d), largest_file(d).stat().st_size // 2),
                            lambda d: str(largest_file(d).relative_to(d))),
    "zeroed data file": (lambda d: largest_file(d).write_bytes(bytes(largest_file(d).stat().st_size)),
                         lambda d: str(largest_file(d).relative_to(d))),
    "deleted state/": (lambda d: shutil.rmtree(d / "state"), lambda d: "state/ is missing"),
    "garbage _METADATA": (lambda d: (d / "state" / "_METADATA").write_text("{not json"), lambda d: "state/_METADATA"),
    "truncated _METADATA": (lambda d: os.truncate(d / "state" / "_METADATA", 50), lambda d: "state/_METADATA"),
    "garbage config JSON": (lambda d: (d / "config" / "metadata").write_text("{{"), lambda d: "config/metadata"),
    "deleted data file": (lambda d: (d / "data" / "metadata").unlink(), lambda d: "data/metadata is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_latest_step_is_reported_and_the_previous_one_restored(two_steps, damage):
    run, cfg = two_steps
    hurt, named = DAMAGES[damage]
    name = named(run / "8")  # before the damage: a deleted file cannot be looked up after
    hurt(run / "8")
    before = digest(run)
    lines = []
    step, state, data, files = RunCheckpointer(run, every=1, keep=5).restore_newest(target_of(tiny_state(0)), cfg,
                                                                                    log=lines.append)
    assert step == 4 and data == {"shards": {"0": {"at": 4}}} and files == {"tokenizer.model": b"tok"}
    for a, b in zip(jax.tree.leaves(tiny_state(4)), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # exactly the step-4 state
    assert len(lines) == 2 and all("\n" not in line for line in lines), lines
    assert f"{run}/8: " in lines[0] and name in lines[0] and "left in place" in lines[0], lines[0]
    assert "does not fit" not in lines[0]
    assert lines[1].startswith("resuming from step 4") and "newest intact" in lines[1], lines[1]
    assert digest(run) == before  # nothing deleted, nothing written


def test_steps_without_a_manifest_restore_unverified(two_steps):
    """Steps saved before manifests existed (or whose hashing a kill cut off): one that reads
    is used, saying so; one that does not is damage, in one line, never 'does not fit'."""
    run, cfg = two_steps
    for step in (4, 8):
        (run / str(step) / f"{MANIFEST}.0.json").unlink()
    lines = []
    ck = RunCheckpointer(run, every=1, keep=5)
    assert ck.restore_newest(target_of(tiny_state(0)), cfg, log=lines.append)[0] == 8
    assert lines == [f"resuming from step 8 in {run} (unverified: it has no integrity manifest)"]
    for hurt in (lambda d: os.truncate(largest_file(d), 100), lambda d: os.truncate(d / "state" / "_METADATA", 50)):
        hurt(run / "8")
        lines = []
        step, state, _, _ = RunCheckpointer(run, every=1, keep=5).restore_newest(target_of(tiny_state(0)), cfg,
                                                                                 log=lines.append)
        assert step == 4 and float(state["params"]["b"][0]) == 4.0
        assert len(lines) == 2 and f"{run}/8: cannot read its train state" in lines[0], lines
        assert "does not fit" not in lines[0] and "\n" not in lines[0]
        assert lines[1].startswith("resuming from step 4") and "unverified" in lines[1]


def test_a_damaged_manifest_and_all_steps_damaged(two_steps):
    run, cfg = two_steps
    (run / "8" / f"{MANIFEST}.0.json").write_text("{")
    os.truncate(largest_file(run / "4"), 10)
    before = digest(run)
    lines = []
    with pytest.raises(CheckpointError, match=r"every checkpoint step is damaged \(8, 4\)") as e:
        RunCheckpointer(run, every=1, keep=5).restore_newest(target_of(tiny_state(0)), cfg, log=lines.append)
    assert "\n" not in str(e.value)
    assert len(lines) == 2 and f"integrity manifest {MANIFEST}.0.json is not readable" in lines[0]
    assert f"{run}/4: " in lines[1] and "truncated (10 of" in lines[1]
    assert digest(run) == before


def test_a_step_that_does_not_fit_is_refused_not_skipped(two_steps):
    run, cfg = two_steps
    other = {"step": jnp.int32(0), "params": {"w": jnp.zeros((64, 32)), "b": jnp.zeros(7)}}
    with pytest.raises(CheckpointError, match="does not fit this config") as e:
        RunCheckpointer(run, every=1, keep=5).restore_newest(target_of(other), cfg, log=lambda line: None)
    assert not isinstance(e.value, CheckpointDamaged) and f"{run}/8" in str(e.value)


def test_find_stage_checkpoint_names_the_newest_step_even_if_damaged(two_steps):
    run, _ = two_steps
    shutil.rmtree(run / "8" / "state")
    assert find_stage_checkpoint(run) == (run, 8)  # not step 4 silently: restoring 8 reports it
    assert find_stage_checkpoint(run / "4") == (run, 4)  # checkpoint.init_from=<run>/<step>
    with pytest.raises(CheckpointDamaged, match="state/ is missing"):
        RunCheckpointer(run, every=1, keep=5, read_only=True).verify(8)
    assert RunCheckpointer(run, every=1, keep=5, read_only=True).newest_intact_step(below=8) == 4


def test_params_checkpoint_is_verified(tmp_path):
    cfg = load_config(CONFIGS / "models" / "tiny_qwen2.yaml").model
    _, abstract = nnx.split(abstract_model(cfg))
    state = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), abstract)
    path = save_params(tmp_path / "params", cfg, state)
    assert sealed(path) and "config.yaml" in json.loads((path / f"{MANIFEST}.0.json").read_text())["files"]
    restore_params(path)  # intact
    meta = path / "state" / "_METADATA"
    good = meta.read_bytes()
    os.truncate(meta, 50)
    with pytest.raises(CheckpointDamaged, match=rf"{path}: state/_METADATA is truncated \(50 of {len(good)} bytes\)"):
        restore_params(path)
    (path / f"{MANIFEST}.0.json").unlink()  # a params checkpoint converted before manifests
    with pytest.raises(CheckpointDamaged, match="cannot read its params metadata") as e:
        restore_params(path)
    assert "does not fit" not in str(e.value) and "\n" not in str(e.value)
    meta.write_bytes(good)
    restore_params(path)  # unverified, but it reads


def test_checkpoint_dir_that_is_a_file_or_cannot_be_created(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=rf"checkpoint.dir: {f} is a file, not a directory"):
        RunCheckpointer(f, every=1, keep=1)
    with pytest.raises(ConfigError, match=rf"checkpoint.dir: cannot create {f}/run: {f} is a file"):
        RunCheckpointer(f / "run", every=1, keep=1)
    assert f.read_text() == "x"
    # where mkdir itself fails (sysfs refuses it even to root, as a read-only directory would a user)
    with pytest.raises(ConfigError, match="^checkpoint.dir: cannot create /sys/r1jax-test/run: [^\n]+$"):
        RunCheckpointer("/sys/r1jax-test/run", every=1, keep=1)


# ----------------------------------------------------------------- logs after a resume -------------

@flax.struct.dataclass
class Counter:
    step: jax.Array


def loop_cfg(run_dir: Path, steps: int = 10):
    return load_config(CONFIGS / "models" / "tiny_qwen2.yaml",
                       [f"checkpoint.dir={run_dir}", f"train.steps={steps}", "train.log_every=1"])


def run_counter(cfg, start: int, run: int, evals: list):
    """run_loop from step `start` with a step that counts; loss = step + run / 100 (each run's rows
    are told apart), eval accuracy = run / 10."""
    def step_fn(state, batch, rng):
        return Counter(state.step + 1), {"loss": int(state.step) + 1 + run / 100}

    def eval_fn(state):
        evals.append(int(state.step))
        return {"accuracy": run / 10}

    return run_loop(cfg, step_fn, Counter(jnp.int32(start)), iter(lambda: {"tokens": np.zeros((1, 4))}, None),
                    data_state=dict, checkpointer=None, tokenizer_files={}, eval_fn=eval_fn, eval_every=4)[1]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tb_purges(run_dir: Path) -> list[tuple[int, int]]:
    """(step, status) of the session-log events in the TensorBoard files under run_dir/tb (TFRecord
    framing: length, its crc, the event, its crc)."""
    out = []
    for f in (run_dir / "tb").iterdir():
        data, i = f.read_bytes(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = Event.FromString(data[i + 12:i + 12 + n])
            if event.HasField("session_log"):
                out.append((event.step, event.session_log.status))
            i += 12 + n + 4
    return out


def test_a_resume_logs_each_step_once(tmp_path):
    run_dir = tmp_path / "run"
    cfg = loop_cfg(run_dir)
    ran: list[int] = []
    run_counter(cfg, 0, run=1, evals=ran)
    assert ran == [4, 8, 10] and [r["step"] for r in rows(run_dir / "metrics.jsonl")] == list(range(1, 11))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "lo')  # the line a SIGKILL cut short
    # the run resumes from its step-8 checkpoint: steps 9, 10 and the eval at 10 happen again
    ran = []
    result = run_counter(cfg, 8, run=2, evals=ran)
    assert ran == [10]  # the eval at step 8 was logged before the step-8 checkpoint: not run again
    metrics = rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, 11))
    assert [r["loss"] for r in metrics] == [s + 0.01 for s in range(1, 9)] + [9.02, 10.02]
    assert [(e["step"], e["accuracy"]) for e in rows(run_dir / "evals.jsonl")] == [(4, 0.1), (8, 0.1), (10, 0.2)]
    assert result.last["loss"] == 10.02
    # TensorBoard: the resumed writer starts with a purge of the steps from 9 on (TensorBoard hides
    # the events of the first run there); the event files are named by the second they open in
    assert (9, SessionLog.START) in tb_purges(run_dir)
    # rerunning the finished run: nothing to train, nothing appended, the logged last step reported
    before = {f: (run_dir / f).read_bytes() for f in ("metrics.jsonl", "evals.jsonl")}
    ran = []
    result = run_counter(cfg, 10, run=3, evals=ran)
    assert ran == [] and {f: (run_dir / f).read_bytes() for f in before} == before
    assert result.last["loss"] == 10.02 and [(e["step"], e["accuracy"]) for e in result.evals] == [(10, 0.2)]
    assert (11, SessionLog.START) in tb_purges(run_dir)
