"""In-graph sampling: a jitted prefill, then a `lax.while_loop` decode over a fixed-size cache.

MLA models decode in the absorbed form over the compressed cache (kv_lora_rank + qk_rope_head_dim
values per token and layer); GQA models over a K/V cache. Prompts of different lengths share a
batch (right-padded; each row writes its continuation after its own prompt). Greedy when
temperature is 0, otherwise temperature / top-k / top-p sampling. A row stops at eos or any stop
token (kept in the output) or after max_new_tokens.

`generate` returns tokens [B, P + max_new_tokens], new lengths [B], and for each generated token
log pi(token) under the model's untempered distribution (what the training forward recomputes).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

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


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Logits [B, V] of the sampling distribution: divide by temperature, keep the top_k largest
    (0: all), then the smallest set whose probability reaches top_p (1.0: all); the rest -inf."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        keep = before < top_p  # always keeps the most likely token
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "stop_ids", "vocab_limit"))
def generate(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, lengths: jax.Array, rng: jax.Array, *,
             max_new_tokens: int, eos_id: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (), vocab_limit: int = 0) -> dict:
    """Continue right-padded prompts tokens [B, T] (lengths [B]; T >= max prompt + max_new_tokens:
    only the first T - max_new_tokens positions are prefilled).

    vocab_limit > 0 never emits ids >= vocab_limit: the model's vocabulary is often padded past the
    tokenizer's (e.g. for sharding), and those rows' logits are not text.

    Returns {"tokens" [B, T], "lengths" [B], "logprobs" [B, max_new_tokens] (0 past a row's end),
    "num_new" [B]}.
    """
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    cache = model.init_cache(b, t)
    # Prompts fit in the first T - max_new_tokens positions (the contract above): prefill only those.
    width = t - max_new_tokens if 0 < max_new_tokens < t else t
    logits, cache = model.prefill(tokens[:, :width], lengths, cache)
    stops = jnp.asarray([eos_id, *stop_ids], jnp.int32)

    def cond(carry):
        i, _, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, toks, lens, done, logits, cache, logps, key = carry
        key, sub = jax.random.split(key)
        allowed = logits
        if 0 < vocab_limit < logits.shape[-1]:
            allowed = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
        if temperature == 0.0:
            nxt = jnp.argmax(allowed, axis=-1).astype(jnp.int32)
        else:
            nxt = jax.random.categorical(sub, filter_logits(allowed, temperature, top_k, top_p)).astype(jnp.int32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), nxt[:, None], -1)[:, 0]
        live = ~done & (lens < t)
        nxt = jnp.where(live, nxt, 0)
        toks = jnp.where(live[:, None] & (jnp.arange(t)[None] == lens[:, None]), nxt[:, None], toks)
        logps = logps.at[:, i].set(jnp.where(live, logp, 0.0))
        done = done | (live & jnp.isin(nxt, stops)) | (lens + 1 >= t)
        pos = jnp.minimum(lens, t - 1)
        lens = jnp.where(live, lens + 1, lens)
        logits, cache = model.decode_step(nxt, pos, cache)
        return i + 1, toks, lens, done, logits, cache, logps, key

    init = (jnp.int32(0), tokens, lengths, jnp.zeros((b,), bool), logits, cache,
            jnp.zeros((b, max_new_tokens), jnp.float32), rng)
    _, toks, new_lens, _, _, _, logps, _ = jax.lax.while_loop(cond, body, init)
    return {"tokens": toks, "lengths": new_lens, "logprobs": logps, "num_new": new_lens - lengths}
