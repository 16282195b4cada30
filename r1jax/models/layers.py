"""Building blocks: parameters with logical axes, RMSNorm, rotary embeddings (+YaRN, llama3), MLP."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.config import ModelConfig, RopeScaling

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class RouterBias(nnx.Variable):
    """Non-trainable per-expert bias of the aux-loss-free balancer (DeepSeek-V3 section 2.1.2)."""


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype,
          init: str = "normal", std: float = 0.02) -> nnx.Param:
    """A parameter created with its logical axis names (see r1jax.sharding.RULES)."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    elif init == "ones":
        value = jnp.ones(tuple(shape), jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(tuple(shape), jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), axes=tuple(axes))


class RMSNorm(nnx.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in float32 and cast back (as the reference)."""

    def __init__(self, dim: int, eps: float, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("norm",), param_dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, d_model: int, d_ff: int, cfg: ModelConfig, rngs: nnx.Rngs):
        pd, std = DTYPES[cfg.param_dtype], cfg.init_std
        self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), pd, std=std)
        self.w_up = param(rngs, (d_model, d_ff), ("embed", "mlp"), pd, std=std)
        self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), pd, std=std)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        gate = x @ self.w_gate[...].astype(dt)  # [..., d_ff]
        up = x @ self.w_up[...].astype(dt)
        return (jax.nn.silu(gate) * up) @ self.w_down[...].astype(dt)


# --------------------------------------------------------------------------------------------------
# Rotary position embeddings
# --------------------------------------------------------------------------------------------------


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: RopeScaling | None) -> tuple[np.ndarray, float]:
    """Inverse frequencies [dim // 2] (float32) and the factor applied to cos/sin.

    Plain RoPE: theta^(-2i/dim). YaRN (Peng et al. 2023, as DeepSeek-V2/V3 use it): per frequency,
    blend interpolation (divide by `factor`) and extrapolation with a linear ramp between the
    dimensions that make `beta_fast` and `beta_slow` rotations over the original context; cos/sin
    are scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim). Llama 3.1: keep high
    frequencies, divide low ones by `factor`, interpolate smoothly between the two wavelength bands.
    """
    f32 = np.float32
    pos_freqs = f32(theta) ** (np.arange(0, dim, 2, dtype=f32) / f32(dim))
    inv_freq = (f32(1.0) / pos_freqs).astype(f32)
    if scaling is None:
        return inv_freq, 1.0
    if scaling.type == "yarn":
        factor, orig = scaling.factor, scaling.original_max_position_embeddings

        def correction_dim(n_rot: float) -> float:  # the dimension that rotates n_rot times over orig
            return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
        high = min(math.ceil(correction_dim(scaling.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
        extrapolate = f32(1) - ramp  # 1 where the frequency is kept as is
        interp = f32(1.0) / (f32(factor) * pos_freqs)
        inv_freq = (interp * (1 - extrapolate) + inv_freq * extrapolate).astype(f32)
        if scaling.mscale and scaling.mscale_all_dim:
            attn_factor = yarn_mscale(factor, scaling.mscale) / yarn_mscale(factor, scaling.mscale_all_dim)
        else:
            attn_factor = yarn_mscale(factor)
        return inv_freq, float(attn_factor)
    if scaling.type == "llama3":
        factor, orig = scaling.factor, scaling.original_max_position_embeddings
        low_wavelen = orig / scaling.low_freq_factor
        high_wavelen = orig / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / f32(factor), inv_freq)
        smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(f32), 1.0
    raise ValueError(f"unknown rope scaling {scaling.type!r}")


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(d_qk), times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek-V2/V3 MLA)."""
    d = cfg.qk_head_dim if cfg.is_mla else cfg.gqa_head_dim
    scale = d ** -0.5
    s = cfg.rope_scaling
    if s is not None and s.type == "yarn" and s.mscale_all_dim:
        scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2
    return scale


def rope_cos_sin(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [batch, length, rope_dim // 2] (float32) for integer positions [batch, length]."""
    inv_freq, attn_factor = rope_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, S, D/2]
    return jnp.cos(angles) * attn_factor, jnp.sin(angles) * attn_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool) -> jax.Array:
    """Rotate x [batch, length, heads, dim] by position.

    interleaved (DeepSeek): dimension pairs (x0, x1), (x2, x3), ... each rotate by one frequency;
    the rotated result is laid out as [even parts | odd parts]. The same layout is used for queries
    and keys, so q.k equals that of the reference's interleaved output.
    half (Llama/Qwen): pairs (x_i, x_{i + dim/2}).
    """
    dt = x.dtype
    c, s = cos[:, :, None, :].astype(dt), sin[:, :, None, :].astype(dt)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
