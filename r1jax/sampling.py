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

import flax.struct
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


@flax.struct.dataclass
class SamplerState:
    """The decode loop's carry: everything one step reads and writes."""

    i: jax.Array  # int32: decode steps taken
    tokens: jax.Array  # [B, T] int32: prompts, then each row's continuation after its own prompt
    lengths: jax.Array  # [B] int32: filled positions per row
    done: jax.Array  # [B] bool: the row hit a stop token or its buffer's end
    logits: jax.Array  # [B, V] float32: the next-token logits of each row
    cache: dict  # the model's KV cache (Transformer.init_cache)
    logprobs: jax.Array  # [B, max_new_tokens] float32: log pi of each generated token
    key: jax.Array  # the sampling key


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
    with jax.named_scope("prefill"):
        logits, cache = model.prefill(tokens[:, :width], lengths, cache)
    stops = jnp.asarray([eos_id, *stop_ids], jnp.int32)

    def cond(s: SamplerState):
        return (s.i < max_new_tokens) & ~jnp.all(s.done)

    def body(s: SamplerState) -> SamplerState:
        key, sub = jax.random.split(s.key)
        allowed = s.logits
        if 0 < vocab_limit < s.logits.shape[-1]:
            allowed = jnp.where(jnp.arange(s.logits.shape[-1]) < vocab_limit, s.logits, -jnp.inf)
        if temperature == 0.0:
            nxt = jnp.argmax(allowed, axis=-1).astype(jnp.int32)
        else:
            nxt = jax.random.categorical(sub, filter_logits(allowed, temperature, top_k, top_p)).astype(jnp.int32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(s.logits.astype(jnp.float32)), nxt[:, None], -1)[:, 0]
        live = ~s.done & (s.lengths < t)
        nxt = jnp.where(live, nxt, 0)
        toks = jnp.where(live[:, None] & (jnp.arange(t)[None] == s.lengths[:, None]), nxt[:, None], s.tokens)
        logps = s.logprobs.at[:, s.i].set(jnp.where(live, logp, 0.0))
        done = s.done | (live & jnp.isin(nxt, stops)) | (s.lengths + 1 >= t)
        pos = jnp.minimum(s.lengths, t - 1)
        lens = jnp.where(live, s.lengths + 1, s.lengths)
        logits, cache = model.decode_step(nxt, pos, s.cache)
        return SamplerState(i=s.i + 1, tokens=toks, lengths=lens, done=done, logits=logits, cache=cache,
                            logprobs=logps, key=key)

    init = SamplerState(i=jnp.int32(0), tokens=tokens, lengths=lengths, done=jnp.zeros((b,), bool), logits=logits,
                        cache=cache, logprobs=jnp.zeros((b, max_new_tokens), jnp.float32), key=rng)
    with jax.named_scope("decode"):
        final = jax.lax.while_loop(cond, body, init)
    return {"tokens": final.tokens, "lengths": final.lengths, "logprobs": final.logprobs,
            "num_new": final.lengths - lengths}
