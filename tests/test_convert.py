"""HF interchange: FP8 dequantisation, exact round trip, clear errors, streaming, sharded loading."""

import json
import shutil
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from conftest import CONFIGS, GOLDEN
from r1jax.config import MeshConfig, load_config
from r1jax.convert import Checkpoint, CheckpointError, dequantize_fp8_blocks, load_hf, save_hf
from r1jax.convert.safetensors_io import SafetensorsWriter
from r1jax.models import abstract_model, init_model
from r1jax.sharding import make_mesh

FP8 = ml_dtypes.float8_e4m3fn


def flat(state):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def random_state(cfg, seed=0):
    """A tiny model with every variable random (router biases and norms included), from numpy."""
    graphdef, abstract = nnx.split(abstract_model(cfg))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32).astype(x.dtype)), abstract)
    return graphdef, state


# ------------------------------------------------------------------ FP8 ------------------------------


def test_fp8_dequant_matches_blockwise_reference():
    rng = np.random.default_rng(0)
    rows, cols, block = 300, 260, (128, 128)  # ragged last blocks on both axes
    w = rng.normal(size=(rows, cols)).astype(FP8)
    scale = rng.uniform(0.01, 2.0, size=(3, 3)).astype(np.float32)
    ref = np.empty((rows, cols), np.float32)
    for bi in range(3):
        for bj in range(3):
            r, c = slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128)
            ref[r, c] = w[r, c].astype(np.float32) * scale[bi, bj]
    np.testing.assert_array_equal(dequantize_fp8_blocks(w, scale, block), ref)
    # a window that starts mid-block (what a device shard reads)
    win = dequantize_fp8_blocks(w[100:290, 130:200], scale, block, row0=100, col0=130)
    np.testing.assert_array_equal(win, ref[100:290, 130:200])


def quantize_fp8(w, block=128):
    """Block-wise FP8 quantisation as DeepSeek-V3's release: amax per 128x128 block -> e4m3 max 448."""
    r, c = w.shape
    gr, gc = -(-r // block), -(-c // block)
    scale = np.zeros((gr, gc), np.float32)
    q = np.zeros_like(w, dtype=FP8)
    for i in range(gr):
        for j in range(gc):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = max(np.abs(blk).max(), 1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s).astype(FP8)
    return q, scale


def test_fp8_checkpoint_loads_dequantised(tmp_path):
    """A DeepSeek-V3-style FP8 checkpoint (weight + weight_scale_inv) loads as its dequantised values."""
    src = Checkpoint(GOLDEN / "deepseek_v3")
    names = src.names
    quantized = {n for n in names if n.endswith("proj.weight") and "embed" not in n}
    plan, data = [], {}
    for n in names:
        w = src.read(n)
        if n in quantized:
            q, s = quantize_fp8(w, block=8)  # small blocks so the tiny weights span several
            data[n], data[n + "_scale_inv"] = q, s
            plan += [(n, q.shape, FP8), (n + "_scale_inv", s.shape, np.float32)]
        else:
            data[n] = w
            plan.append((n, w.shape, np.float32))
    writer = SafetensorsWriter(tmp_path, plan)
    for n, _, _ in plan:
        writer.write(n, data[n])
    writer.close()
    hf_cfg = dict(src.config, quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                   "weight_block_size": [8, 8], "activation_scheme": "dynamic"})
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    cfg, _, state = load_hf(tmp_path)
    got = flat(state)
    q, s = data["model.layers.1.mlp.experts.5.up_proj.weight"], data["model.layers.1.mlp.experts.5.up_proj.weight_scale_inv"]
    expect = (q.astype(np.float32) * np.repeat(np.repeat(s, 8, 0), 8, 1)[:q.shape[0], :q.shape[1]]).T
    np.testing.assert_array_equal(got["moe_blocks/mlp/w_up"][0, 5], expect)
    q, s = data["model.layers.0.self_attn.q_b_proj.weight"], data["model.layers.0.self_attn.q_b_proj.weight_scale_inv"]
    expect = (q.astype(np.float32) * np.repeat(np.repeat(s, 8, 0), 8, 1)[:q.shape[0], :q.shape[1]]).T
    np.testing.assert_array_equal(got["dense_blocks/attn/wq_b"][0].reshape(expect.shape), expect)
    # every quantised tensor, through the exact r1jax -> HF export, equals its block-wise dequantisation
    out = save_hf(state, cfg, tmp_path / "export")
    back = Checkpoint(out)
    for n in sorted(quantized):
        q, sc = data[n], data[n + "_scale_inv"]
        ref = q.astype(np.float32) * np.repeat(np.repeat(sc, 8, 0), 8, 1)[:q.shape[0], :q.shape[1]]
        np.testing.assert_array_equal(back.read(n), ref, err_msg=n)
    assert len(quantized) > 20


# ------------------------------------------------------------------ round trip -----------------------


@pytest.mark.parametrize("preset,dtype", [("tiny_v3", "float32"), ("tiny_v2", "float32"), ("tiny_qwen2", "float32"),
                                          ("tiny_llama3", "float32"), ("tiny_v3", "bfloat16")])
def test_round_trip_exact(tmp_path, preset, dtype):
    cfg = load_config(CONFIGS / "models" / f"{preset}.yaml", [f"model.param_dtype={dtype}"]).model
    graphdef, state = random_state(cfg)
    if cfg.family == "deepseek_v2":  # the V2 format has no correction bias: it must stay zero
        with pytest.raises(CheckpointError, match="no correction bias"):
            save_hf(state, cfg, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
        for p, v in nnx.to_flat_state(state):
            if p[-1] == "router_bias":
                v.set_value(jnp.zeros_like(v.get_value()))
    out = save_hf(state, cfg, tmp_path / "hf", max_shard_bytes=200_000)  # several shards + index
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()
    cfg2, _, state2 = load_hf(out)
    assert cfg2.family == cfg.family and cfg2.mtp_depth == cfg.mtp_depth
    a, b = flat(state), flat(state2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_export_read_by_safetensors_library(tmp_path):
    """An outside reader (the `safetensors` package) sees the same tensors we wrote."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors is in the test extra")
    cfg = load_config(CONFIGS / "models" / "tiny_llama3.yaml").model
    _, state = random_state(cfg)
    out = save_hf(state, cfg, tmp_path / "hf")
    tensors = safetensors_numpy.load_file(str(out / "model.safetensors"))
    w = flat(state)["dense_blocks/attn/wo"][1]  # [H, hd, d]
    np.testing.assert_array_equal(tensors["model.layers.1.self_attn.o_proj.weight"], w.reshape(-1, w.shape[-1]).T)
    assert len(tensors) == len(Checkpoint(out).names)


# ------------------------------------------------------------------ errors ---------------------------


def test_shape_mismatch_names_tensor_and_both_shapes():
    src = Checkpoint(GOLDEN / "deepseek_v3")
    from r1jax.convert import model_config_from_hf
    import dataclasses

    cfg = model_config_from_hf(src.config, tensor_names=src.names)
    bad = dataclasses.replace(cfg, moe_d_ff=24)
    with pytest.raises(CheckpointError) as e:
        load_hf(GOLDEN / "deepseek_v3", bad)
    msg = str(e.value)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in msg and "(16, 32)" in msg and "(24, 32)" in msg


def test_missing_unexpected_and_corrupt(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_hf(tmp_path / "absent")
    d = tmp_path / "ck"
    shutil.copytree(GOLDEN / "qwen2_tied", d)
    cfg, _, _ = load_hf(d)
    import dataclasses

    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.2\.input_layernorm\.weight is missing"):
        load_hf(d, dataclasses.replace(cfg, n_layers=3))
    with pytest.raises(CheckpointError, match=r"tensors not used by the qwen2 model config: model\.layers\.1\."):
        load_hf(d, dataclasses.replace(cfg, n_layers=1))
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*truncated"):
        load_hf(d)


def test_save_refuses_to_overwrite(tmp_path):
    cfg = load_config(CONFIGS / "models" / "tiny_qwen2.yaml").model
    _, state = random_state(cfg)
    out = save_hf(state, cfg, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CheckpointError, match="not empty; refusing to overwrite"):
        save_hf(state, cfg, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".hf.partial*"))


# ------------------------------------------------------------------ streaming + sharding -------------


def test_streaming_host_memory_is_bounded_by_one_layer_slice(tmp_path):
    """Save and load hold on the host at most a few layer-slices of one parameter, never the model."""
    cfg = load_config(CONFIGS / "models" / "tiny_v3.yaml",
                      ["model.d_model=256", "model.moe_d_ff=256", "model.n_routed_experts=16", "model.n_layers=12",
                       "model.mtp_depth=0", "model.vocab_size=256"]).model
    graphdef, state = init_model(cfg, jax.random.key(0))
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    layer_slice = max(x[0].size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim > 2)
    assert size > 100e6 and 4 * layer_slice < 0.2 * size
    tracemalloc.start()
    save_hf(state, cfg, tmp_path / "hf")
    _, save_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    _, _, state2 = load_hf(tmp_path / "hf")
    jax.block_until_ready(state2)
    _, load_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    assert save_peak < 4 * layer_slice, f"save peak {mb(save_peak)}; model {mb(size)}, layer slice {mb(layer_slice)}"
    assert load_peak < 4 * layer_slice, f"load peak {mb(load_peak)}; model {mb(size)}, layer slice {mb(layer_slice)}"


@pytest.mark.parametrize("sizes", [dict(data=2, fsdp=2, expert=2, tensor=1), dict(data=1, fsdp=2, expert=2, tensor=2)])
def test_sharded_load_reads_only_own_slices(devices8, sizes, monkeypatch):
    d = GOLDEN / "deepseek_v3"
    _, _, ref = load_hf(d)
    reads = []
    orig = Checkpoint.read

    def spy(self, name, index=None):
        out = orig(self, name, index)
        reads.append((name, out.size, int(np.prod(self.shape(name)))))
        return out

    monkeypatch.setattr(Checkpoint, "read", spy)
    cfg0, _, _ = load_hf(d)
    mesh = make_mesh(MeshConfig(**sizes), devices8, cfg0)
    reads.clear()
    cfg, _, state = load_hf(d, cfg0, mesh)
    a, b = flat(ref), flat(state)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    w = nnx.to_flat_state(state)
    spec = dict(w)[("moe_blocks", "mlp", "w_gate")].get_value().sharding.spec
    assert spec[1] == "expert"
    # expert weights and FSDP-sharded projections are read in pieces, not whole per device
    partial = [(n, got, full) for n, got, full in reads if "experts" in n or "q_b_proj" in n]
    assert partial and all(got < full for n, got, full in partial), partial[:3]
