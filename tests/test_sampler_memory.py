"""The sampler in bounded memory, against plain re-derivations written here and XLA's own figures:

- `generate` with 64-token prompts and 4k new tokens: XLA's temp bytes within 1.5x the KV cache (the
  cache's bytes counted here from the config), no copy of the cache in the compiled program, the
  cache written by scatters (in place), the token buffer by a per-row scatter (no [N, T] select);
- decode attention over cache blocks equals one softmax over the whole cache row (written out here,
  MLA in its expanded training form) and never reads a block past the longest row;
- samples_per_prompt: each prompt prefilled once, its G rows equal to a full-recompute greedy decode
  and to the prompts repeated by hand;
- top-p from a top-k pre-filter: equal to a full-sort nucleus when it fits, the top-w tokens when not.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS
from flax import nnx

from r1jax.config import load_config
from r1jax.models import forward, init_model
from r1jax.models.attention import GQAttention, MLAttention
from r1jax.models.layers import apply_rope, rope_cos_sin, softmax_scale
from r1jax.models.transformer import Transformer, abstract_model
from r1jax.sampling import filter_logits, generate, pad_prompts

jit_filter = jax.jit(filter_logits, static_argnums=(1, 2, 3, 4))


def tiny_cfg(name, **kw):
    return dataclasses.replace(load_config(CONFIGS / "models" / f"{name}.yaml").model, **kw)


def sub_jaxprs(jaxpr):
    """Every jaxpr nested in `jaxpr` (loop bodies, conds, pjit calls), itself included."""
    yield jaxpr
    for eqn in jaxpr.eqns:
        for v in eqn.params.values():
            for j in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(j, jax.extend.core.ClosedJaxpr):
                    yield from sub_jaxprs(j.jaxpr)
                elif isinstance(j, jax.extend.core.Jaxpr):
                    yield from sub_jaxprs(j)


# --------------------------------------------------------------------------------------------------
# generate at 64 + 4096 tokens: XLA's memory figures and compiled program


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_v3"])
def test_generate_temp_memory_within_1_5x_the_kv_cache_and_no_cache_copy(name):
    prompt, new, prompts, g = 64, 4096, 2, 2
    t, n = prompt + new, prompts * g
    cfg = tiny_cfg(name, max_seq_len=t)
    graphdef, state = nnx.split(abstract_model(cfg))
    args = (graphdef, state, jax.ShapeDtypeStruct((prompts, t), jnp.int32), jax.ShapeDtypeStruct((prompts,), jnp.int32),
            jax.eval_shape(lambda: jax.random.key(0)))
    traced = generate.trace(*args, max_new_tokens=new, eos_id=1, temperature=1.0, top_p=0.95, samples_per_prompt=g)
    # compiled as a user's program is: with XLA:CPU's default fusion emitters, which this suite's
    # processes turn off to compile faster (conftest.xla_flags) and which emit the cache writes
    compiled = traced.lower().compile(compiler_options={"xla_cpu_use_fusion_emitters": True})

    # the cache, counted from the config: per token and layer MLA keeps kv_lora + rope values, GQA 2 x K x hd
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.is_mla else 2 * cfg.kv_heads * cfg.gqa_head_dim
    cache_bytes = cfg.n_layers * n * t * per_token * np.dtype(cfg.dtype).itemsize
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 1.5 * cache_bytes, f"temp {temp / 2**20:.2f} MiB vs KV cache {cache_bytes / 2**20:.2f} MiB"

    # the compiled program (fused computations included): every op whose result has a cache buffer's
    # shape is a scatter (the in-place per-token write), the prefill's pad, or plumbing; none is a copy
    group_layers = [k for k in (cfg.n_dense_layers, cfg.n_moe_layers) if k]
    tails = [(cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)] if cfg.is_mla else [(cfg.kv_heads, cfg.gqa_head_dim)]
    shapes = {",".join(map(str, (layers, n, t, *tail))) for layers in group_layers for tail in tails}
    text = compiled.as_text()
    opcodes = {m[2] for m in re.finditer(r"= f32\[([\d,]+)\]\{[\d,]*\} ([\w-]+)\(", text) if m[1] in shapes}
    assert "scatter" in opcodes, opcodes
    assert not opcodes & {"copy", "copy-start", "dynamic-update-slice", "concatenate", "select"}, opcodes
    assert opcodes <= {"parameter", "get-tuple-element", "scatter", "fusion", "pad", "broadcast", "bitcast",
                       "while", "tuple"}, opcodes

    # the token buffer [N, T]: written by a per-row scatter, never rebuilt by a select over the whole buffer
    buffers = [(e.primitive.name, e.outvars[0].aval.shape) for j in sub_jaxprs(traced.jaxpr.jaxpr) for e in j.eqns
               if e.outvars and getattr(e.outvars[0].aval, "shape", None) == (n, t)]
    assert ("scatter", (n, t)) in buffers, buffers
    assert all(p not in ("select_n", "dynamic_update_slice") for p, _ in buffers), buffers


# --------------------------------------------------------------------------------------------------
# decode attention over cache blocks


def scaled_module(cls, cfg, factor=4.0):
    """cls(cfg) with its matrices scaled by `factor` (peaked attention), initialised in one jit."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(3))))
    state = jax.jit(lambda: jax.tree.map(lambda w: w * factor if w.ndim >= 2 else w,
                                         nnx.split(cls(cfg, nnx.Rngs(3)))[1]))()
    return nnx.merge(graphdef, state)


def dense_reference(q_scores, values, pos):
    """softmax over cache positions 0..pos[b] of q_scores [B, H, T] (whole row), times values [B, T, H, D]."""
    t = q_scores.shape[-1]
    s = np.where(np.arange(t)[None, None] <= pos[:, None, None], q_scores, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bht,bthd->bhd", p, values)


def poisoned_cache(rng, shape, layer, first_unread):
    """Random cache [L, B, T, ...]: NaN in every other layer and from position `first_unread` on."""
    cache = rng.normal(size=shape).astype(np.float32)
    cache[np.arange(shape[0]) != layer] = np.nan
    cache[:, :, first_unread:] = np.nan
    return cache


@pytest.mark.parametrize("pos", [[0, 5, 9], [12, 3, 7]], ids=["short", "to-the-end"])
@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_block_decode_attention_equals_the_whole_cache_softmax(kind, pos):
    """T = 13, blocks of 4: rows at different positions; the last block overlaps (read from 9);
    blocks past max(pos) hold NaN and must not be read (nor other layers)."""
    t, block, layers, layer = 13, 4, 3, 1
    pos = np.asarray(pos, np.int32)
    first_unread = min(t, -(-(pos.max() + 1) // block) * block)
    rng = np.random.default_rng(0)
    b = len(pos)
    if kind == "gqa":
        cfg = tiny_cfg("tiny_qwen2", attention_block=block)
        attn = scaled_module(GQAttention, cfg)
        names = {"k": (cfg.kv_heads, cfg.gqa_head_dim), "v": (cfg.kv_heads, cfg.gqa_head_dim)}
    else:
        cfg = tiny_cfg("tiny_v3", attention_block=block)
        attn = scaled_module(MLAttention, cfg)
        names = {"c_kv": (cfg.kv_lora_rank,), "k_rope": (cfg.qk_rope_head_dim,)}
    cache = {k: poisoned_cache(rng, (layers, b, t, *tail), layer, first_unread) for k, tail in names.items()}
    x = jnp.asarray(rng.normal(size=(b, 1, cfg.d_model)), jnp.float32)
    cos, sin = rope_cos_sin(jnp.asarray(pos)[:, None], cfg)
    out, new_cache = jax.jit(lambda c: attn.decode(x, cos, sin, c, jnp.asarray(pos), jnp.int32(layer)))(
        {k: jnp.asarray(v) for k, v in cache.items()})

    # the reference: write the new token's entries, then one softmax over the whole row of layer `layer`
    if kind == "gqa":
        q, k, v = (np.asarray(a[:, 0]) for a in attn.qkv(x, cos, sin))  # [B, H|K, hd]
        new = {"k": k, "v": v}
    else:
        c_kv, k_rope = (np.asarray(a[:, 0]) for a in attn.latents(x, cos, sin))
        new = {"c_kv": c_kv, "k_rope": k_rope}
    want_cache = {name: c.copy() for name, c in cache.items()}
    for name, c in want_cache.items():
        c[layer, np.arange(b), pos] = new[name]
    full = {name: np.nan_to_num(c[layer]) for name, c in want_cache.items()}  # [B, T, ...]; NaN rows masked
    if kind == "gqa":
        group = cfg.n_heads // cfg.kv_heads
        keys, vals = (np.repeat(full[n], group, axis=2) for n in ("k", "v"))  # [B, T, H, hd]
        scores = np.einsum("bhd,bthd->bht", q, keys) * softmax_scale(cfg)
        heads = dense_reference(scores, vals, pos)
    else:  # the expanded (training) form: per-head k_nope and v from c_kv, the shared rope key
        nope = cfg.qk_nope_head_dim
        qh = np.asarray(attn.queries(x)[:, 0])
        q_nope = qh[..., :nope]
        q_rope = np.asarray(apply_rope(jnp.asarray(qh[:, None, :, nope:]), cos, sin, interleaved=True)[:, 0])
        kv = np.einsum("btr,rhk->bthk", full["c_kv"], np.asarray(attn.wkv_b[...]))
        scores = (np.einsum("bhn,bthn->bht", q_nope, kv[..., :nope])
                  + np.einsum("bhd,btd->bht", q_rope, full["k_rope"])) * softmax_scale(cfg)
        heads = dense_reference(scores, kv[..., nope:], pos)
    want = np.einsum("bhv,hvd->bd", heads, np.asarray(attn.wo[...]))
    np.testing.assert_allclose(np.asarray(out[:, 0]), want, rtol=1e-5, atol=1e-5)
    for name in names:
        np.testing.assert_allclose(np.asarray(new_cache[name]), want_cache[name], rtol=1e-5, atol=1e-6)  # NaN kept


# --------------------------------------------------------------------------------------------------
# samples_per_prompt: one prefill per prompt, its cache shared by its G rows


@functools.cache
def tiny_model():
    cfg = tiny_cfg("tiny_qwen2")
    graphdef, state = init_model(cfg, jax.random.key(0))
    return cfg, graphdef, jax.tree.map(lambda x: x * 3 if x.ndim >= 2 else x, state)  # peaked predictions


fwd = jax.jit(forward, static_argnums=0)


def full_recompute_greedy(graphdef, state, prompt, n, width=16):
    """Greedy continuation by re-running the whole sequence for each new token (padding: segment 0)."""
    seq = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, width), np.int32)
        buf[0, :len(seq)] = seq
        logits, _ = fwd(graphdef, state, jnp.asarray(buf), None, jnp.asarray((np.arange(width) < len(seq))[None], jnp.int32))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq


def test_samples_per_prompt_prefills_each_prompt_once_and_groups_its_rows(monkeypatch):
    _, graphdef, state = tiny_model()
    g, n_new = 3, 6
    prompts = [np.array([5, 17, 3, 99, 41], np.int32), np.array([7, 250], np.int32)]
    toks, lens = pad_prompts(prompts, 5 + n_new, 0)
    seen = []
    orig = Transformer.prefill
    monkeypatch.setattr(Transformer, "prefill", lambda self, tokens, *a: seen.append(tokens.shape) or orig(self, tokens, *a))
    greedy = generate(graphdef, state, toks, lens, jax.random.key(0), max_new_tokens=n_new, eos_id=-1,
                      samples_per_prompt=g)
    assert seen == [(2, 5)], seen  # traced once, over the 2 prompts' 5 prompt positions
    got = np.asarray(greedy["tokens"])
    assert got.shape == (2 * g, 5 + n_new) and np.asarray(greedy["num_new"]).tolist() == [n_new] * (2 * g)
    for b, p in enumerate(prompts):
        want = full_recompute_greedy(graphdef, state, p, n_new)
        for j in range(g):
            assert got[b * g + j, :len(want)].tolist() == want, (b, j)

    # sampled: the same as the prompts repeated by hand (same key: the same draws, row by row)
    kw = {"max_new_tokens": n_new, "eos_id": -1, "temperature": 1.0, "top_p": 0.9}
    shared = generate(graphdef, state, toks, lens, jax.random.key(5), samples_per_prompt=g, **kw)
    by_hand = generate(graphdef, state, np.repeat(toks, g, 0), np.repeat(lens, g), jax.random.key(5), **kw)
    np.testing.assert_array_equal(np.asarray(shared["tokens"]), np.asarray(by_hand["tokens"]))
    np.testing.assert_allclose(np.asarray(shared["logprobs"]), np.asarray(by_hand["logprobs"]), atol=1e-5)
    first = np.asarray(shared["tokens"])[:g, 5:]
    assert len({tuple(r) for r in first}) > 1, "the G rows of a prompt must draw independently"
    with pytest.raises(ValueError, match="samples_per_prompt=0"):
        generate(graphdef, state, toks, lens, jax.random.key(0), max_new_tokens=n_new, eos_id=-1, samples_per_prompt=0)


# --------------------------------------------------------------------------------------------------
# top-p from a top-k pre-filter


def nucleus_reference(logits, temperature, top_k, top_p):
    """Kept-token mask [B, V] by a full sort (float64): top_k (ties kept), then the smallest prefix
    of the most likely tokens whose renormalised mass reaches top_p (ties with its last kept)."""
    z = logits.astype(np.float64) / temperature
    if top_k:
        z = np.where(z < np.sort(z, -1)[:, -top_k][:, None], -np.inf, z)
    keep = np.zeros(z.shape, bool)
    for r, row in enumerate(z):
        p = np.exp(row - row.max())
        p /= p.sum()
        order = np.argsort(-row, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        cutoff = row[order][before < top_p].min()
        keep[r] = row >= cutoff
    return keep


def test_top_p_prefilter_equals_the_full_sort_nucleus_when_it_fits():
    rng = np.random.default_rng(0)
    v, width, top_p, temperature = 300, 32, 0.9, 0.8
    logits = rng.normal(size=(6, v)) * np.array([[0.3], [1.0], [2.0], [3.0], [5.0], [8.0]])  # flat to peaked
    logits = logits.astype(np.float32)
    got = np.asarray(jit_filter(jnp.asarray(logits), temperature, 0, top_p, width))
    exact = nucleus_reference(logits, temperature, 0, top_p)
    fits = exact.sum(-1) <= width
    assert fits.any() and (~fits).any(), exact.sum(-1)  # both regimes are exercised
    kept = np.isfinite(got)
    np.testing.assert_array_equal(kept[fits], exact[fits])
    np.testing.assert_allclose(got[kept], (logits / temperature)[kept], rtol=1e-6)
    # past the width: the `width` most likely tokens, i.e. top_k = width applied first
    top_w = np.argsort(-logits, axis=-1)[:, :width]
    for r in np.nonzero(~fits)[0]:
        assert set(np.nonzero(kept[r])[0]) == set(top_w[r]), r
    # with top_k set, the nucleus always fits: exact top-k then top-p
    got_k = np.asarray(jit_filter(jnp.asarray(logits), temperature, 20, 0.7, width))
    np.testing.assert_array_equal(np.isfinite(got_k), nucleus_reference(logits, temperature, 20, 0.7))
    # no sort of the vocabulary in the program (one top_k of width `width`)
    jaxpr = jax.make_jaxpr(lambda x: filter_logits(x, temperature, 0, top_p, top_p_width=width))(logits).jaxpr
    prims = [(e.primitive.name, e.params.get("k")) for j in sub_jaxprs(jaxpr) for e in j.eqns]
    assert "sort" not in {p for p, _ in prims} and ("top_k", width) in prims, prims
