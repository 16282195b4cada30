"""Sampling from the model inside the compiled graph.

`greedy_generate_recompute` re-runs the whole forward pass for every new token over a fixed-size
buffer: simple, exact, and fast enough for the short held-out evaluations of SFT runs on tiny
models. (The KV-cache sampler with temperature / top-k / top-p arrives with GRPO.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def pad_prompts(prompts: list[np.ndarray], total_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad prompts into [B, total_len] int32 and their lengths [B]."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.max() > total_len:
        raise ValueError(f"a prompt of {lengths.max()} tokens does not fit a buffer of {total_len}")
    buf = np.full((len(prompts), total_len), pad_id, np.int32)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    return buf, lengths


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def greedy_generate_recompute(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, lengths: jax.Array,
                              eos_id: int, max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Greedy continuation of right-padded prompts.

    tokens [B, T] holds each prompt in its first lengths[b] positions (T >= prompt + max_new_tokens).
    Returns (tokens [B, T] with the continuations written after each prompt, new_lengths [B]).
    A row stops after it emits eos (the eos is kept).
    """
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def body(_, carry):
        toks, lens, done = carry
        seg = (pos < lens[:, None]).astype(jnp.int32)
        logits, _ = model(toks, pos, seg)
        nxt = jnp.argmax(jnp.take_along_axis(logits, (lens - 1)[:, None, None], axis=1)[:, 0], -1).astype(jnp.int32)
        write = ~done & (lens < t)
        toks = jnp.where(write[:, None] & (pos == lens[:, None]), nxt[:, None], toks)
        lens = jnp.where(write, lens + 1, lens)
        return toks, lens, done | (write & (nxt == eos_id))

    toks, lens, _ = jax.lax.fori_loop(0, max_new_tokens, body, (tokens, lengths, jnp.zeros((b,), bool)))
    return toks, lens
