"""Attention: multi-head latent attention (DeepSeek-V2/V3) and grouped-query attention (Qwen2, Llama 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.models.layers import DTYPES, RMSNorm, apply_rope, param, softmax_scale
from r1jax.sharding import constrain

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

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 want_cache: bool = False) -> jax.Array | tuple[jax.Array, dict]:
        """x [B, S, d] -> [B, S, d]; with want_cache also the decode-cache entries of these tokens."""
        cfg, dt = self.cfg, x.dtype
        q = constrain(self.queries(x), ("batch", "length", "act_heads", None))
        q_nope, q_rope = jnp.split(q, [cfg.qk_nope_head_dim], axis=-1)
        q = jnp.concatenate([q_nope, apply_rope(q_rope, cos, sin, interleaved=True)], axis=-1)
        c_kv, k_rope = self.latents(x, cos, sin)
        kv = jnp.einsum("bsr,rhk->bshk", c_kv, self.wkv_b[...].astype(dt))  # [B, S, H, nope + v]
        kv = constrain(kv, ("batch", "length", "act_heads", None))
        k_nope, v = jnp.split(kv, [cfg.qk_nope_head_dim], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:3], cfg.qk_rope_head_dim))], -1)
        out = dot_product_attention(q, k, v, mask, softmax_scale(cfg))  # [B, S, H, v]
        out = constrain(out, ("batch", "length", "act_heads", None))
        out = jnp.einsum("bshv,hvd->bsd", out, self.wo[...].astype(dt))
        # what the decode cache keeps per token: the normed latent and the rotated shared rope key
        return (out, {"c_kv": c_kv, "k_rope": k_rope}) if want_cache else out

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: dict, pos: jax.Array) -> tuple[jax.Array, dict]:
        """One new token per row in the absorbed form (DeepSeek-V2 section 2.1.3) over the compressed cache.

        x [B, 1, d]; cache {"c_kv": [B, T, r], "k_rope": [B, T, rope]}; pos [B] the new token's slot.
        W_UK is folded into the query (q_nope W_UK^T attends to c_kv directly) and W_UV is applied
        after the attention-weighted sum of c_kv, so per-head keys and values are never expanded.
        """
        cfg, dt = self.cfg, x.dtype
        c_kv, k_rope = self.latents(x, cos, sin)
        cache = {"c_kv": _write(cache["c_kv"], c_kv[:, 0], pos), "k_rope": _write(cache["k_rope"], k_rope[:, 0], pos)}
        q = self.queries(x)[:, 0]  # [B, H, nope + rope]
        q_nope, q_rope = jnp.split(q, [cfg.qk_nope_head_dim], axis=-1)
        q_rope = apply_rope(q_rope[:, None], cos, sin, interleaved=True)[:, 0]
        wkv_b = self.wkv_b[...].astype(dt)  # [r, H, nope + v]
        w_uk, w_uv = wkv_b[..., :cfg.qk_nope_head_dim], wkv_b[..., cfg.qk_nope_head_dim:]
        q_latent = jnp.einsum("bhn,rhn->bhr", q_nope, w_uk)
        scores = (jnp.einsum("bhr,btr->bht", q_latent, cache["c_kv"], preferred_element_type=jnp.float32)
                  + jnp.einsum("bhd,btd->bht", q_rope, cache["k_rope"], preferred_element_type=jnp.float32))
        t = cache["c_kv"].shape[1]
        valid = jnp.arange(t)[None, None, :] <= pos[:, None, None]
        probs = jax.nn.softmax(jnp.where(valid, scores * softmax_scale(cfg), _NEG), axis=-1).astype(dt)
        o_latent = jnp.einsum("bht,btr->bhr", probs, cache["c_kv"])
        out = jnp.einsum("bhr,rhv->bhv", o_latent, w_uv)
        return jnp.einsum("bhv,hvd->bd", out, self.wo[...].astype(dt))[:, None], cache


def _write(buf: jax.Array, value: jax.Array, pos: jax.Array) -> jax.Array:
    """buf[b, pos[b]] = value[b] for every row b. buf [B, T, ...]; value [B, ...]."""
    return jax.vmap(lambda c, v, p: jax.lax.dynamic_update_index_in_dim(c, v, p, 0))(buf, value.astype(buf.dtype), pos)


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

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 want_cache: bool = False) -> jax.Array | tuple[jax.Array, dict]:
        """x [B, S, d] -> [B, S, d]; with want_cache also the rotated k and v [B, S, K, hd]."""
        q, k, v = self.qkv(x, cos, sin)
        out = dot_product_attention(q, k, v, mask, softmax_scale(self.cfg))
        out = constrain(out, ("batch", "length", "act_heads", None))
        out = jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(x.dtype))
        return (out, {"k": k, "v": v}) if want_cache else out

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: dict, pos: jax.Array) -> tuple[jax.Array, dict]:
        """One new token per row over the K/V cache. x [B, 1, d]; cache k, v [B, T, K, hd]; pos [B]."""
        q, k, v = self.qkv(x, cos, sin)
        cache = {"k": _write(cache["k"], k[:, 0], pos), "v": _write(cache["v"], v[:, 0], pos)}
        t = cache["k"].shape[1]
        mask = jnp.arange(t)[None, None, :] <= pos[:, None, None]  # [B, 1, T]
        out = dot_product_attention(q, cache["k"], cache["v"], mask, softmax_scale(self.cfg))
        return jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(x.dtype)), cache
