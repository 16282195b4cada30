"""Attention: multi-head latent attention (DeepSeek-V2/V3) and grouped-query attention (Qwen2, Llama 3)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from r1jax.config import ModelConfig
from r1jax.models.layers import DTYPES, RMSNorm, apply_rope, param, softmax_scale
from r1jax.sharding import active_mesh, constrain, logical_to_spec, mesh_shape

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row stays finite


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[batch, q, k] bool: causal, within the same segment, never onto padding (segment id 0).

    Packed rows hold several documents one after another, each with its own segment id, so causal
    order within the row plus equal segment ids keeps every token inside its document.
    """
    s = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((s, s), jnp.bool_))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same & (segment_ids[:, None, :] != 0)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v with float32 logits.

    q [B, S, H, Dk]; k [B, T, K, Dk]; v [B, T, K, Dv]; H a multiple of K (grouped queries);
    mask [B, S, T] bool. Returns [B, S, H, Dv].
    """
    b, s, h, dk = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, s, kv_heads, h // kv_heads, dk)  # [B, S, K, G, Dk]
    logits = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None], logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)  # [B, S, K, G, Dv]
    return out.reshape(b, s, h, v.shape[-1])


# --------------------------------------------------------------------------------------------------
# Causal attention within packed documents: one entry point, four implementations
# --------------------------------------------------------------------------------------------------


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, cfg: ModelConfig,
              lengths: jax.Array | None = None) -> jax.Array:
    """Causal self-attention within packed documents, softmax(q k^T * softmax_scale(cfg)) v: the one
    entry point of the MLA and GQA training forwards and of prefill.

    q [B, S, H, Dk]; k [B, S, K, Dk]; v [B, S, K, Dv] with H a multiple of K (grouped queries; MLA
    passes K = H and Dk != Dv, e.g. 192 / 128); segment_ids [B, S] int, 0 for padding, distinct ids
    for the documents packed in a row. Token s sees token t <= s of its own document. `lengths` [B],
    when given, says each row is one document right-padded to S (segment_ids == arange(S) < lengths),
    the form cuDNN takes. Returns [B, S, H, Dv] in v's dtype. Rows of padding come out finite (zero
    on the blockwise path) and are never read by valid tokens.

    The implementation is `attention_impl(cfg, ...)`: dense builds the [B, S, S] mask and scores
    (the reference); blockwise, splash and cudnn never build an [S, S] array.
    """
    scale = softmax_scale(cfg)
    impl = attention_impl(cfg, q.dtype, q.shape[-1], v.shape[-1], single_documents=lengths is not None)
    if impl == "dense":
        return dot_product_attention(q, k, v, attention_mask(segment_ids), scale)
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids, scale, cfg.attention_block)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, lengths, scale)
    return blockwise_attention(q, k, v, segment_ids, scale, cfg.attention_block)


def attention_impl(cfg: ModelConfig, dtype, dk: int, dv: int, single_documents: bool) -> str:
    """The implementation `attention` runs: cfg.attention, with auto resolved by the default backend
    (TPU -> splash; GPU -> cudnn where `cudnn_fits`, else blockwise; CPU -> blockwise). cudnn, chosen
    or automatic, falls back to blockwise on calls it cannot take (packed rows, see cudnn_attention)."""
    impl = cfg.attention
    if impl == "auto":
        impl = {"tpu": "splash", "gpu": "cudnn"}.get(jax.default_backend(), "blockwise")
    if impl == "cudnn" and not (single_documents and cudnn_fits(dtype, dk, dv)):
        return "blockwise"
    return impl


def _block_mask(q_seg: jax.Array, k_seg: jax.Array, q_start, k_start) -> jax.Array:
    """[B, cq, ck] bool for a block of queries (row indices q_start + 0..cq-1, segment ids q_seg
    [B, cq]) against a block of keys (k_start + 0..ck-1, k_seg [B, ck]): causal by row index, same
    document, key not padding. `attention_mask` of the whole row, restricted to the block pair."""
    causal = (q_start + jnp.arange(q_seg.shape[-1]))[:, None] >= (k_start + jnp.arange(k_seg.shape[-1]))[None, :]
    return causal[None] & (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)


def _scores(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """q [B, cq, K, G, Dk], k [B, ck, K, Dk] -> scaled float32 logits [B, K, G, cq, ck]."""
    return jnp.einsum("bqkgd,btkd->bkgqt", q, k, preferred_element_type=jnp.float32) * scale


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float,
                        block: int) -> jax.Array:
    """Flash-style attention in pure JAX (FlashAttention-2, Dao 2023): queries and keys in blocks of
    at most `block` tokens, an online softmax over the key blocks, and only the block pairs on or
    below the diagonal computed (causal block skipping: about half the FLOPs of dense at many
    blocks). Logits and accumulators are float32. The backward pass (custom VJP) saves the output and
    the per-row logsumexp and recomputes each block's probabilities, so memory is O(S x block) in
    both directions. A sequence that fits in one block takes a plain masked softmax instead (short
    sequences, tiny test models: straight-line code, no loops to compile). Shapes as `attention`;
    S need not be a multiple of the block (padded internally with padding tokens).
    """
    b, s, h, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[-1]
    qg = q.reshape(b, s, kv_heads, h // kv_heads, dk)  # [B, S, K, G, Dk]
    n = -(-s // block)  # blocks per row
    if n == 1:
        out = _one_block(qg, k, v, segment_ids, scale)
    else:
        c = -(-s // n)  # blocks as even as possible: at most n - 1 tokens of padding
        pad = [(0, 0), (0, n * c - s)]
        qg, k, v = (jnp.pad(x, pad + [(0, 0)] * (x.ndim - 2)) for x in (qg, k, v))
        out = _flash(qg, k, v, jnp.pad(segment_ids, pad), scale, c)[:, :s]
    return out.reshape(b, s, h, dv)


def _one_block(q, k, v, seg, scale):
    """The whole row as one block: q [B, S, K, G, Dk], k [B, S, K, Dk], v [B, S, K, Dv], seg [B, S]
    -> [B, S, K, G, Dv] (v's dtype); a query that sees no key gets 0. Differentiated by autodiff."""
    mask = _block_mask(seg, seg, 0, 0)[:, None, None]  # [B, 1, 1, S, S]
    logits = jnp.where(mask, _scores(q, k, scale), _NEG)
    p = jnp.where(mask, jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True))), 0.0)
    denom = p.sum(-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("bkgqt,btkd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(v.dtype)


def _blocks(x: jax.Array, c: int) -> jax.Array:
    """[B, n * c, ...] -> [n, B, c, ...]: blocks of c tokens on a leading axis, for lax.scan."""
    return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // c, c, *x.shape[2:]), 1, 0)


def _unblocks(x: jax.Array) -> jax.Array:
    """[n, B, c, ...] -> [B, n * c, ...], the inverse of _blocks."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _at(x: jax.Array, i) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, seg, scale, c):
    """q [B, S, K, G, Dk], k [B, S, K, Dk], v [B, S, K, Dv], seg [B, S] with S a multiple of c (> 1
    block) -> [B, S, K, G, Dv] in v's dtype."""
    return _flash_fwd(q, k, v, seg, scale, c)[0]


def _flash_fwd(q, k, v, seg, scale, c):
    """Forward: for each query block i, an online softmax over key blocks 0..i (a loop bounded by i:
    no work above the diagonal). Returns out and residuals (inputs, out, logsumexp [n, B, K, G, c])."""
    qb, kb, vb, sb = _blocks(q, c), _blocks(k, c), _blocks(v, c), _blocks(seg, c)
    _, b, _, kv_heads, g, _ = qb.shape
    dv = v.shape[-1]

    def query_block(_, xs):
        i, q_i, seg_i = xs

        def key_block(j, carry):
            m, denom, acc = carry  # running max and sum [B, K, G, c], weighted values [B, K, G, c, Dv]
            v_j = _at(vb, j)
            mask = _block_mask(seg_i, _at(sb, j), i * c, j * c)[:, None, None]
            logits = jnp.where(mask, _scores(q_i, _at(kb, j), scale), _NEG)
            m_new = jnp.maximum(m, logits.max(-1))
            p = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)
            rescale = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqt,btkd->bkgqd", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
            return m_new, rescale * denom + p.sum(-1), rescale[..., None] * acc + pv

        init = (jnp.full((b, kv_heads, g, c), _NEG, jnp.float32), jnp.zeros((b, kv_heads, g, c), jnp.float32),
                jnp.zeros((b, kv_heads, g, c, dv), jnp.float32))
        m, denom, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
        seen = denom > 0  # false on rows that see no key (padding): output 0, logsumexp 0
        safe = jnp.where(seen, denom, 1.0)
        out_i = jnp.einsum("bkgqd->bqkgd", acc / safe[..., None]).astype(v.dtype)
        return None, (out_i, jnp.where(seen, m + jnp.log(safe), 0.0))

    _, (ob, lse) = jax.lax.scan(query_block, None, (jnp.arange(qb.shape[0]), qb, sb))
    out = _unblocks(ob)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(scale, c, res, d_out):
    """Backward (FlashAttention-2 Algorithm 2): for each key block j, the query blocks j..n-1 that see
    it; probabilities recomputed from the saved logsumexp, dS = P * (dP - rowsum(dO * O)). dq is
    accumulated block by block in one [n, B, c, K, G, Dk] float32 buffer carried through the loop."""
    q, k, v, seg, out, lse = res
    qb, kb, vb, sb, dob = _blocks(q, c), _blocks(k, c), _blocks(v, c), _blocks(seg, c), _blocks(d_out, c)
    n = qb.shape[0]
    f32 = jnp.float32
    delta = jnp.einsum("nbqkgd,nbqkgd->nbkgq", _blocks(out, c).astype(f32), dob.astype(f32))  # [n, B, K, G, c]

    def key_block(dq, xs):
        j, k_j, v_j, seg_j = xs

        def query_block(i, carry):
            dq, dk_j, dv_j = carry
            q_i, do_i = _at(qb, i), _at(dob, i)
            mask = _block_mask(_at(sb, i), seg_j, i * c, j * c)[:, None, None]
            p = jnp.where(mask, jnp.exp(_scores(q_i, k_j, scale) - _at(lse, i)[..., None]), 0.0)  # [B, K, G, c, c]
            dv_j = dv_j + jnp.einsum("bkgqt,bqkgd->btkd", p.astype(do_i.dtype), do_i, preferred_element_type=f32)
            dp = jnp.einsum("bqkgd,btkd->bkgqt", do_i, v_j, preferred_element_type=f32)
            ds = p * (dp - _at(delta, i)[..., None]) * scale  # d logits before the scale
            dk_j = dk_j + jnp.einsum("bkgqt,bqkgd->btkd", ds.astype(q_i.dtype), q_i, preferred_element_type=f32)
            dq_i = jnp.einsum("bkgqt,btkd->bqkgd", ds.astype(k_j.dtype), k_j, preferred_element_type=f32)
            return jax.lax.dynamic_update_index_in_dim(dq, _at(dq, i) + dq_i, i, 0), dk_j, dv_j

        init = (dq, jnp.zeros(k_j.shape, f32), jnp.zeros(v_j.shape, f32))
        dq, dk_j, dv_j = jax.lax.fori_loop(j, n, query_block, init)
        return dq, (dk_j, dv_j)

    dq, (dkb, dvb) = jax.lax.scan(key_block, jnp.zeros(qb.shape, f32), (jnp.arange(n), kb, vb, sb))
    return (_unblocks(dq).astype(q.dtype), _unblocks(dkb).astype(k.dtype), _unblocks(dvb).astype(v.dtype), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float, block: int,
                     interpret: bool | None = None) -> jax.Array:
    """Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention): a causal mask
    with SegmentIds, blocks of `block` tokens rounded up to the kernel's 128 lanes, its own fused
    backward kernel. Shapes as `attention` (GQA through the kernel's multi-head form with K kv heads).

    The kernel sees one device's rows and heads: under a mesh it runs in a shard_map over the batch
    axes and, where the mesh shards heads, the tensor axis. Padding tokens (segment 0) attend among
    themselves (the kernel needs a visible key on every row); no valid token sees them. `interpret`
    (default: on any backend but TPU) runs the kernel in the Pallas interpreter, for tests on CPU.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    _, s, h, _ = q.shape
    c = -(-min(block, s) // 128) * 128
    sp = -(-s // c) * c
    pad = [(0, 0), (0, sp - s)]
    seg = jnp.pad(segment_ids, pad)
    q = (q * jnp.asarray(scale, q.dtype)).astype(q.dtype)  # the kernel does not scale
    qt, kt, vt = (jnp.swapaxes(jnp.pad(x, pad + [(0, 0)] * 2), 1, 2) for x in (q, k, v))  # [B, heads, Sp, D]

    def local(qt, kt, vt, seg):  # [b, h, Sp, D] of one device
        mask = splash.MultiHeadMask([splash.CausalMask((sp, sp))] * qt.shape[1])
        sizes = splash.BlockSizes(block_q=c, block_kv=c, block_kv_compute=c, block_q_dkv=c, block_kv_dkv=c,
                                  block_kv_dkv_compute=c, use_fused_bwd_kernel=True)
        kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        return jax.vmap(lambda q, k, v, sg: kernel(q, k, v, segment_ids=splash.SegmentIds(sg, sg)))(qt, kt, vt, seg)

    mesh = active_mesh()
    if mesh is not None:
        sizes = mesh_shape(mesh)
        q_spec = logical_to_spec(("batch", "act_heads", None, None), sizes, qt.shape)
        kv_spec = logical_to_spec(("batch", "act_kv_heads", None, None), sizes, kt.shape)
        if kv_spec[1] != q_spec[1]:  # kv heads not split like the query heads: give each query head its own
            kt, vt = (jnp.repeat(x, h // x.shape[1], axis=1) for x in (kt, vt))
            kv_spec = q_spec
        local = jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None)), out_specs=q_spec,
                              check_vma=False)
    return jnp.swapaxes(local(qt, kt, vt, seg), 1, 2)[:, :s]


def cudnn_fits(dtype, dk: int, dv: int) -> bool:
    """Whether cuDNN flash attention takes these heads: bfloat16 or float16, and the (padded, see
    cudnn_attention) head dim max(dk, dv) a multiple of 8 and at most 128, or 256 on Hopper and later."""
    d = max(dk, dv)
    devices = jax.devices()
    hopper = devices[0].platform == "gpu" and float(getattr(devices[0], "compute_capability", 0)) >= 9.0
    return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= (256 if hopper else 128)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array | None, scale: float) -> jax.Array:
    """cuDNN flash attention through jax.nn.dot_product_attention(implementation="cudnn"), causal, with
    per-row sequence lengths [B] (or none). Shapes as `attention`.

    Its constraints (jax 0.10.2), which `attention_impl` checks before choosing it:
    - no packed documents: the public API takes one length per row, not segment ids, so only calls
      that pass `lengths` (prefill, unpacked batches) come here; packed rows run blockwise;
    - dtype bfloat16 or float16; head dim a multiple of 8, at most 128 (256 on Hopper and later);
    - the API wants v shaped like k: MLA's unequal heads (192 / 128) are zero-padded to the larger
      dim and the output sliced back (exact; 1.5x the PV work at 192 / 128). cuDNN's native unequal
      head dims (cuDNN >= 9.10 on Hopper) are reachable only through jax's private cudnn module.
    """
    d, dv = max(q.shape[-1], v.shape[-1]), v.shape[-1]
    widen = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, d - x.shape[-1])])  # noqa: E731
    out = jax.nn.dot_product_attention(widen(q), widen(k), widen(v), scale=scale, is_causal=True,
                                       query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       implementation="cudnn")
    return out[..., :dv]


class MLAttention(nnx.Module):
    """Multi-head latent attention (DeepSeek-V2 section 2.1, V3 section 2.1.1), training form.

    Queries: x -> (q_lora_rank -> RMSNorm ->) heads x (nope + rope). Keys/values: x -> a compressed
    latent c_kv [kv_lora_rank] (RMSNorm'd) plus one decoupled RoPE key [qk_rope_head_dim] shared by
    all heads; c_kv expands to per-head k_nope and v. The rotary part uses interleaved pairs.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pd, std = DTYPES[cfg.param_dtype], cfg.init_std
        d, h = cfg.d_model, cfg.n_heads
        if cfg.q_lora_rank:
            self.wq_a = param(rngs, (d, cfg.q_lora_rank), ("embed", "q_lora"), pd, std=std)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, pd, rngs)
            self.wq_b = param(rngs, (cfg.q_lora_rank, h, cfg.qk_head_dim), ("q_lora", "heads", "head_dim"), pd, std=std)
        else:
            self.wq = param(rngs, (d, h, cfg.qk_head_dim), ("embed", "heads", "head_dim"), pd, std=std)
        self.wkv_a = param(rngs, (d, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora"), pd, std=std)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps, pd, rngs)
        self.wkv_b = param(rngs, (cfg.kv_lora_rank, h, cfg.qk_nope_head_dim + cfg.v_head_dim),
                           ("kv_lora", "heads", "head_dim"), pd, std=std)
        self.wo = param(rngs, (h, cfg.v_head_dim, d), ("heads", "head_dim", "embed"), pd, std=std)

    def queries(self, x: jax.Array) -> jax.Array:
        """[B, S, d_model] -> [B, S, H, qk_nope + qk_rope] (before rotary)."""
        dt = x.dtype
        if self.cfg.q_lora_rank:
            cq = self.q_norm(x @ self.wq_a[...].astype(dt))  # [B, S, q_lora]
            return jnp.einsum("bsr,rhk->bshk", cq, self.wq_b[...].astype(dt))
        return jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(dt))

    def latents(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The per-token cache of MLA: c_kv [B, S, kv_lora] (normed) and the rotated k_rope [B, S, rope]."""
        kv = x @ self.wkv_a[...].astype(x.dtype)  # [B, S, kv_lora + rope]
        c_kv, k_rope = jnp.split(kv, [self.cfg.kv_lora_rank], axis=-1)
        k_rope = apply_rope(k_rope[:, :, None, :], cos, sin, interleaved=True)[:, :, 0]
        return self.kv_norm(c_kv), k_rope

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array,
                 lengths: jax.Array | None = None, want_cache: bool = False) -> jax.Array | tuple[jax.Array, dict]:
        """x [B, S, d] -> [B, S, d]; with want_cache also the decode-cache entries of these tokens.
        segment_ids [B, S] and lengths [B] | None as in `attention`."""
        cfg, dt = self.cfg, x.dtype
        q = constrain(self.queries(x), ("batch", "length", "act_heads", None))
        q_nope, q_rope = jnp.split(q, [cfg.qk_nope_head_dim], axis=-1)
        q = jnp.concatenate([q_nope, apply_rope(q_rope, cos, sin, interleaved=True)], axis=-1)
        c_kv, k_rope = self.latents(x, cos, sin)
        kv = jnp.einsum("bsr,rhk->bshk", c_kv, self.wkv_b[...].astype(dt))  # [B, S, H, nope + v]
        kv = constrain(kv, ("batch", "length", "act_heads", None))
        k_nope, v = jnp.split(kv, [cfg.qk_nope_head_dim], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:3], cfg.qk_rope_head_dim))], -1)
        out = attention(q, k, v, segment_ids, cfg, lengths)  # [B, S, H, v]
        out = constrain(out, ("batch", "length", "act_heads", None))
        out = jnp.einsum("bshv,hvd->bsd", out, self.wo[...].astype(dt))
        # what the decode cache keeps per token: the normed latent and the rotated shared rope key
        return (out, {"c_kv": c_kv, "k_rope": k_rope}) if want_cache else out

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: dict, pos: jax.Array,
               layer: jax.Array) -> tuple[jax.Array, dict]:
        """One new token per row in the absorbed form (DeepSeek-V2 section 2.1.3) over the compressed cache.

        x [B, 1, d]; cache {"c_kv": [L, B, T, r], "k_rope": [L, B, T, rope]}, every layer of this
        block group, of which this is layer `layer` (int32 scalar); pos [B] the new token's slot.
        Returns (out [B, 1, d], the cache with this token written in place at [layer, b, pos[b]]).
        W_UK is folded into the query (q_nope W_UK^T attends to c_kv directly) and W_UV is applied
        after the attention-weighted sum of c_kv, so per-head keys and values are never expanded.
        Only the cache blocks up to max(pos) are read (`_attend_cache`).
        """
        cfg, dt = self.cfg, x.dtype
        c_kv, k_rope = self.latents(x, cos, sin)
        cache = {"c_kv": _write(cache["c_kv"], c_kv[:, 0], layer, pos),
                 "k_rope": _write(cache["k_rope"], k_rope[:, 0], layer, pos)}
        q = self.queries(x)[:, 0]  # [B, H, nope + rope]
        q_nope, q_rope = jnp.split(q, [cfg.qk_nope_head_dim], axis=-1)
        q_rope = apply_rope(q_rope[:, None], cos, sin, interleaved=True)[:, 0]
        wkv_b = self.wkv_b[...].astype(dt)  # [r, H, nope + v]
        w_uk, w_uv = wkv_b[..., :cfg.qk_nope_head_dim], wkv_b[..., cfg.qk_nope_head_dim:]
        q_latent = jnp.einsum("bhn,rhn->bhr", q_nope, w_uk)
        scale = softmax_scale(cfg)

        def scores(blk):  # [B, H, W] float32
            return (jnp.einsum("bhr,bwr->bhw", q_latent, blk["c_kv"], preferred_element_type=jnp.float32)
                    + jnp.einsum("bhd,bwd->bhw", q_rope, blk["k_rope"], preferred_element_type=jnp.float32)) * scale

        def mix(probs, blk):  # [B, H, r] float32
            return jnp.einsum("bhw,bwr->bhr", probs.astype(dt), blk["c_kv"], preferred_element_type=jnp.float32)

        o_latent = _attend_cache(cache, layer, pos, cfg.attention_block, scores, mix).astype(dt)  # [B, H, r]
        out = jnp.einsum("bhr,rhv->bhv", o_latent, w_uv)
        return jnp.einsum("bhv,hvd->bd", out, self.wo[...].astype(dt))[:, None], cache


def _write(buf: jax.Array, value: jax.Array, layer: jax.Array, pos: jax.Array) -> jax.Array:
    """buf[layer, b, pos[b]] = value[b] for every row b: one scatter of B entries, which XLA does in
    place on a buffer carried through the decode loop. buf [L, B, T, ...]; value [B, ...]; layer an
    int32 scalar; pos [B] int32 in [0, T)."""
    rows = jnp.arange(buf.shape[1])
    return buf.at[layer, rows, pos].set(value.astype(buf.dtype), mode="promise_in_bounds", unique_indices=True)


def _attend_cache(cache: dict, layer: jax.Array, pos: jax.Array, block: int, scores, mix) -> jax.Array:
    """Softmax attention of one query per row b over cached positions 0..pos[b] of layer `layer`,
    reading only the blocks of `block` positions that hold 0..max(pos): the cost follows the
    longest live row, not the buffer length T. An online softmax (a running max and sum, as in
    flash attention, Dao et al. 2022) combines the blocks; the result equals one softmax over the
    whole cache row masked past pos[b].

    cache {name: [L, B, T, ...]}; layer int32 scalar; pos [B] int32.
    scores(blk) -> [B, *heads, W] float32 scaled logits of blk = {name: [B, W, ...]}, W cached tokens;
    mix(probs [B, *heads, W] float32, blk) -> [B, *heads, D] float32, the probability-weighted values.
    Returns [B, *heads, D] float32.
    """
    t = next(iter(cache.values())).shape[2]
    w = min(block, t)

    def read(i):
        first = i * w
        start = jnp.minimum(first, t - w)  # a last partial block is read from t - w; its overlap is masked
        blk = {k: jax.lax.dynamic_slice(c, (layer, 0, start) + (0,) * (c.ndim - 3), (1, c.shape[1], w, *c.shape[3:]))[0]
               for k, c in cache.items()}
        key_pos = start + jnp.arange(w)
        valid = (key_pos[None] >= first) & (key_pos[None] <= pos[:, None])  # [B, W]
        s = scores(blk)
        return blk, jnp.where(valid.reshape(valid.shape[0], *(1,) * (s.ndim - 2), w), s, -jnp.inf)

    blk, s = read(0)  # position 0 is valid in every row: the running max is finite from here on
    m = s.max(-1)
    p = jnp.exp(s - m[..., None])
    carry = (m, p.sum(-1), mix(p, blk))

    def body(i, carry):
        m, denom, acc = carry
        blk, s = read(i)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])  # 0 where masked
        corr = jnp.exp(m - m_new)
        return m_new, denom * corr + p.sum(-1), acc * corr[..., None] + mix(p, blk)

    n_blocks = (jnp.max(pos) + w) // w  # the blocks holding positions 0..max(pos)
    _, denom, acc = jax.lax.fori_loop(1, n_blocks, body, carry)
    return acc / denom[..., None]


class GQAttention(nnx.Module):
    """Grouped-query attention with half-split rotary (Llama 3; Qwen2 adds a bias to q, k, v)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pd, std = DTYPES[cfg.param_dtype], cfg.init_std
        d, h, kvh, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.gqa_head_dim
        self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd, std=std)
        self.wk = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), pd, std=std)
        self.wv = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), pd, std=std)
        if cfg.qkv_bias:
            self.bq = param(rngs, (h, hd), ("heads", "head_dim"), pd, init="zeros")
            self.bk = param(rngs, (kvh, hd), ("kv_heads", "head_dim"), pd, init="zeros")
            self.bv = param(rngs, (kvh, hd), ("kv_heads", "head_dim"), pd, init="zeros")
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd, std=std)

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Rotated q [B, S, H, hd], rotated k and v [B, S, K, hd]."""
        dt = x.dtype
        q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(dt))
        k = jnp.einsum("bsd,dhk->bshk", x, self.wk[...].astype(dt))
        v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...].astype(dt))
        if self.cfg.qkv_bias:
            q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        q = constrain(apply_rope(q, cos, sin, interleaved=False), ("batch", "length", "act_heads", None))
        k = constrain(apply_rope(k, cos, sin, interleaved=False), ("batch", "length", "act_kv_heads", None))
        return q, k, constrain(v, ("batch", "length", "act_kv_heads", None))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array,
                 lengths: jax.Array | None = None, want_cache: bool = False) -> jax.Array | tuple[jax.Array, dict]:
        """x [B, S, d] -> [B, S, d]; with want_cache also the rotated k and v [B, S, K, hd].
        segment_ids [B, S] and lengths [B] | None as in `attention`."""
        q, k, v = self.qkv(x, cos, sin)
        out = attention(q, k, v, segment_ids, self.cfg, lengths)
        out = constrain(out, ("batch", "length", "act_heads", None))
        out = jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(x.dtype))
        return (out, {"k": k, "v": v}) if want_cache else out

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: dict, pos: jax.Array,
               layer: jax.Array) -> tuple[jax.Array, dict]:
        """One new token per row over the K/V cache. x [B, 1, d]; cache k, v [L, B, T, K, hd], every
        layer of this block group, of which this is layer `layer` (int32 scalar); pos [B] the new
        token's slot. Returns (out [B, 1, d], the cache with this token written in place at
        [layer, b, pos[b]]). Only the cache blocks up to max(pos) are read (`_attend_cache`)."""
        q, k, v = self.qkv(x, cos, sin)
        cache = {"k": _write(cache["k"], k[:, 0], layer, pos), "v": _write(cache["v"], v[:, 0], layer, pos)}
        b, _, h, hd = q.shape
        kv_heads = k.shape[2]
        qg = q[:, 0].reshape(b, kv_heads, h // kv_heads, hd)  # [B, K, G, hd]
        scale = softmax_scale(self.cfg)

        def scores(blk):  # [B, K, G, W] float32
            return jnp.einsum("bkgd,bwkd->bkgw", qg, blk["k"], preferred_element_type=jnp.float32) * scale

        def mix(probs, blk):  # [B, K, G, hd] float32
            return jnp.einsum("bkgw,bwkd->bkgd", probs.astype(blk["v"].dtype), blk["v"],
                              preferred_element_type=jnp.float32)

        out = _attend_cache(cache, layer, pos, self.cfg.attention_block, scores, mix)
        out = out.reshape(b, 1, h, v.shape[-1]).astype(x.dtype)
        return jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(x.dtype)), cache
