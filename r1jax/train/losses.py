"""Losses as small pure functions: token cross-entropy, MTP targets (GRPO and distillation join later)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of counted tokens.

    logits [..., V] (float32); targets [...] int; mask [...] (bool or 0/1). Returns
    (sum over masked positions of -log softmax(logits)[target], sum of mask), both float32.
    """
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return jnp.sum((logz - picked) * m), jnp.sum(m)


def per_token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] at every position, float32 [...]."""
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]


def mtp_targets(targets: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array, depth: int):
    """Targets and masks of the MTP modules (DeepSeek-V3 eq. 24).

    Depth k (1-based) at position i predicts token i + 1 + k, which is targets[i + k]. A position
    counts when that token is a trained (loss_mask) token of the same document. Returns
    (targets [D, B, S] int32, mask [D, B, S] bool).
    """
    b, s = targets.shape
    outs, masks = [], []
    for k in range(1, depth + 1):
        pad = ((0, 0), (0, k))
        t = jnp.pad(targets[:, k:], pad)
        m = jnp.pad(loss_mask[:, k:].astype(bool), pad)
        same = jnp.pad(segment_ids[:, k:], pad) == segment_ids
        outs.append(t)
        masks.append(m & same & (segment_ids != 0))
    return jnp.stack(outs).astype(jnp.int32), jnp.stack(masks)
