"""The attention implementations of models/attention.py against a dense reference written out here.

Batches are packed: several documents per row, one crossing a block boundary, trailing padding, a
row of padding only, and a length that is not a multiple of the block. Outputs are compared on
valid tokens (padding rows are only required finite), gradients of a loss over valid tokens.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CONFIGS
from r1jax.config import MeshConfig, load_config
from r1jax.models import attention as A

SCALE = 0.3
# (heads, kv heads, qk head dim, v head dim)
GQA = (4, 2, 16, 16)
MLA = (2, 2, 24, 16)  # per-head keys (K = H), qk and v head dims unequal as in MLA (192 / 128)


def reference(q, k, v, seg, scale):
    """softmax(q k^T * scale + mask) v with the causal + same-document + no-padding mask built
    explicitly; query head h reads kv head h // (H / K)."""
    s, g = q.shape[1], q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    i = jnp.arange(s)
    causal = i[:, None] >= i[None, :]
    mask = causal[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)  # [B, S, S]
    logits = jnp.einsum("bshd,bthd->bhst", q, k) * scale
    probs = jax.nn.softmax(jnp.where(mask[:, None], logits, -1e30), axis=-1)
    return jnp.einsum("bhst,bthd->bshd", probs, v)


def packed_segments(s: int) -> np.ndarray:
    """[4, s]: three documents then padding; two documents, the second crossing every boundary of
    blocks of 16; one document filling the row; padding only."""
    seg = np.zeros((4, s), np.int32)
    seg[0, :11], seg[0, 11:20], seg[0, 20:s - 7] = 1, 2, 3
    seg[1, :5], seg[1, 5:s - 3] = 7, 8
    seg[2, :] = 4
    return seg


def inputs(dims, s, seed=0):
    h, kvh, dk, dv = dims
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    b = 4
    q = jax.random.normal(kq, (b, s, h, dk))
    k = jax.random.normal(kk, (b, s, kvh, dk))
    v = jax.random.normal(kv, (b, s, kvh, dv))
    w = jax.random.normal(kw, (b, s, h, dv))  # weights of the loss over outputs
    return q, k, v, w, jnp.asarray(packed_segments(s))


def check_against_reference(fn, dims, s, tol=1e-5):
    """fn(q, k, v, seg) equals `reference` on valid tokens, output and d/dq, d/dk, d/dv; returns the output."""
    q, k, v, w, seg = inputs(dims, s)
    valid = (seg != 0)[:, :, None, None]

    def loss(f, q, k, v):
        return jnp.sum(jnp.where(valid, f(q, k, v, seg) * w, 0.0))

    want = reference(q, k, v, seg, SCALE)
    want_grads = jax.grad(functools.partial(loss, reference_fn), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(fn)(q, k, v, seg)
    got_grads = jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2)))(q, k, v)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=tol, rtol=0)
    for name, g, r in zip("qkv", got_grads, want_grads):
        assert np.abs(np.asarray(r)).max() > 0.1, name  # a gradient worth comparing
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=tol, rtol=0, err_msg=f"d/d{name}")
    return got, seg


def reference_fn(q, k, v, seg):
    return reference(q, k, v, seg, SCALE)


@pytest.mark.parametrize("dims", [GQA, MLA], ids=["gqa", "mla"])
@pytest.mark.parametrize("block", [16, 64], ids=["4-blocks", "one-block"])
def test_blockwise_equals_dense_reference(dims, block):
    """S = 50: four blocks of 13 (50 is no multiple of 16: padded to 52), or one block of 50."""
    got, seg = check_against_reference(lambda q, k, v, seg: A.blockwise_attention(q, k, v, seg, SCALE, block),
                                       dims, 50)
    assert (np.asarray(got)[np.asarray(seg) == 0] == 0).all()  # padding rows: zero, not NaN


def test_dense_impl_is_the_reference():
    check_against_reference(lambda q, k, v, seg: A.dot_product_attention(q, k, v, A.attention_mask(seg), SCALE),
                            GQA, 20)


@pytest.mark.slow
def test_splash_interpret_equals_dense_reference():
    """The Pallas TPU kernel in the interpreter on CPU: GQA heads with MLA's unequal head dims,
    S = 150 padded to two kernel blocks of 128."""
    check_against_reference(lambda q, k, v, seg: A.splash_attention(q, k, v, seg, SCALE, 128, interpret=True),
                            (4, 2, 24, 16), 150)


@pytest.mark.slow
def test_splash_per_shard_under_a_mesh(devices8):
    """Under a mesh that shards batch and heads, the kernel runs per shard (shard_map) and the
    result is the single-device one."""
    from r1jax.sharding import make_mesh

    q, k, v, _, seg = inputs((4, 2, 24, 16), 150)
    want = reference(q, k, v, seg, SCALE)
    fn = jax.jit(lambda q, k, v, seg: A.splash_attention(q, k, v, seg, SCALE, 128, interpret=True))
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=1, tensor=2), devices8[:4])
    with jax.set_mesh(mesh):
        assert "manual_computation" in fn.lower(q, k, v, seg).as_text()  # the shard_map
        got = fn(q, k, v, seg)
    valid = (seg != 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=1e-5, rtol=0)


def _abstract(b, s, h, kvh, dk, dv, dtype):
    return (jax.ShapeDtypeStruct((b, s, h, dk), dtype), jax.ShapeDtypeStruct((b, s, kvh, dk), dtype),
            jax.ShapeDtypeStruct((b, s, kvh, dv), dtype))


def _with_vjp(fn):
    def f(q, k, v, *rest):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, *rest), q, k, v)
        return out, vjp(out)
    return f


def test_splash_lowers_for_tpu():
    """The real kernel (not the interpreter), forward and backward, at MLA's 192 / 128 head dims."""
    q, k, v = _abstract(2, 256, 4, 2, 192, 128, jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    f = _with_vjp(lambda q, k, v, seg: A.splash_attention(q, k, v, seg, SCALE, 128, interpret=False))
    text = jax.export.export(jax.jit(f), platforms=["tpu"])(q, k, v, seg).mlir_module()
    assert text.count("tpu_custom_call") == 2  # the forward kernel and the fused backward kernel


def test_cudnn_lowers_for_cuda(monkeypatch):
    """cuDNN flash attention, forward and backward, causal with per-row lengths, MLA-like unequal
    head dims zero-padded to one. The CPU jaxlib has no cuDNN, so jax's trace-time version check
    raises "cuDNN is not detected."; a stand-in version (9.10) lets the call lower."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    q, k, v = _abstract(2, 256, 4, 2, 24, 16, jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    f = _with_vjp(lambda q, k, v, n: A.cudnn_attention(q, k, v, n, SCALE))
    calls = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
    exp = jax.export.export(jax.jit(f), platforms=["cuda"],
                            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(c) for c in calls])(
        q, k, v, lengths)
    text = exp.mlir_module()
    assert set(re.findall(r"custom_call @([\w$]+)", text)) == set(calls)
    assert re.findall(r"mask_type\\22: \\22(\w+)", text) == ["PADDING_CAUSAL"] * 2
    assert [a.shape for a in exp.out_avals] == [(2, 256, 4, 16), (2, 256, 4, 24), (2, 256, 2, 24), (2, 256, 2, 16)]


def test_implementation_choice():
    cfg = load_config(CONFIGS / "models" / "tiny_qwen2.yaml").model
    pick = lambda impl, dtype=jnp.bfloat16, single=True, dk=64: A.attention_impl(  # noqa: E731
        dataclasses.replace(cfg, attention=impl), dtype, dk, dk, single)
    assert jax.default_backend() == "cpu" and pick("auto") == "blockwise"
    assert pick("dense") == "dense" and pick("splash") == "splash" and pick("blockwise") == "blockwise"
    assert pick("cudnn") == "cudnn"
    assert pick("cudnn", single=False) == "blockwise"  # packed rows: no segment ids in the cuDNN API
    assert pick("cudnn", dtype=jnp.float32) == "blockwise"
    assert pick("cudnn", dk=192) == "blockwise"  # above 128 only on Hopper


def _largest_buffer(text: str) -> int:
    """Elements of the largest array shape named in HLO text."""
    return max(int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
               for dims in re.findall(r"(?:f32|bf16|pred|s32|f16)\[([\d,]*)\]", text))


def test_blockwise_hlo_holds_no_sxs_buffer():
    """Forward + backward at S = 2048, block 256: no buffer of S x S elements (dense has them)."""
    s, block = 2048, 256
    q, k, v = _abstract(1, s, 2, 1, 16, 16, jnp.float32)
    seg = jax.ShapeDtypeStruct((1, s), jnp.int32)

    def compiled(fn):
        loss = lambda q, k, v, seg: jnp.sum(fn(q, k, v, seg))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v, seg).compile().as_text()

    blockwise = _largest_buffer(compiled(lambda q, k, v, seg: A.blockwise_attention(q, k, v, seg, SCALE, block)))
    dense = _largest_buffer(compiled(lambda q, k, v, seg: A.dot_product_attention(q, k, v, A.attention_mask(seg),
                                                                                  SCALE)))
    assert dense >= s * s  # the check sees an [S, S] buffer where there is one
    assert blockwise <= 2 * block * block, blockwise  # the [B, K, G, block, block] scores of one block pair


# tiny_v3's attention (MLA) without its MoE layers and MTP module, which this test does not need to compile
MLA_ONLY = ["model.mtp_depth=0", "model.n_routed_experts=0", "model.first_k_dense_replace=0", "model.n_layers=2"]


@pytest.mark.parametrize("preset", ["tiny_qwen2", "tiny_v3"])
def test_model_blockwise_equals_dense(preset):
    """The whole model (GQA or MLA): logits with several attention blocks per row equal the dense path's."""
    from r1jax.models import forward, init_model

    logits = {}
    for impl in ("dense", "blockwise"):
        cfg = load_config(CONFIGS / "models" / f"{preset}.yaml", [f"model.attention={impl}", "model.attention_block=16",
                                                                  *(MLA_ONLY if preset == "tiny_v3" else [])]).model
        graphdef, state = init_model(cfg, jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (4, 50), 1, cfg.vocab_size)
        seg = jnp.asarray(packed_segments(50))
        logits[impl], _ = jax.jit(functools.partial(forward, graphdef))(state, tokens, segment_ids=seg)
    valid = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(logits["blockwise"])[valid], np.asarray(logits["dense"])[valid],
                               atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny_qwen2", "tiny_v3"])
def test_sft_step_memory_grows_linearly(preset):
    """XLA's temp bytes of one compiled SFT step (abstract inputs, one device) grow at most 6x from
    2k to 8k tokens with the default attention (blockwise on CPU); dense attention grows ~15x."""
    from r1jax.train.sft import BATCH_KEYS, sft_step
    from r1jax.train.state import abstract_train_state, make_context

    temp = {}
    for s in (2048, 8192):
        cfg = load_config(CONFIGS / "models" / f"{preset}.yaml",
                          ["mesh.fsdp=1", f"model.max_seq_len={s}", f"train.seq_len={s}", "train.batch_size=1"])
        assert cfg.model.attention == "auto"
        ctx = make_context(cfg)
        batch = {k: jax.ShapeDtypeStruct((1, s), jnp.int32) for k in BATCH_KEYS}
        step = jax.jit(functools.partial(sft_step, ctx=ctx))
        temp[s] = step.lower(abstract_train_state(ctx), batch, None).compile().memory_analysis().temp_size_in_bytes
    assert temp[8192] <= 6 * temp[2048], (temp[2048] / 2**20, temp[8192] / 2**20)


def test_cudnn_config_errors_name_the_key():
    from r1jax.config import ConfigError

    with pytest.raises(ConfigError, match="model.attention: cudnn needs dtype bfloat16, got float32"):
        load_config(CONFIGS / "models" / "tiny_qwen2.yaml", ["model.attention=cudnn"])
    assert load_config(CONFIGS / "models" / "tiny_qwen2.yaml",
                       ["model.attention=cudnn", "model.dtype=bfloat16"]).model.attention == "cudnn"
