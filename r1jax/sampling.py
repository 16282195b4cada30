"""In-graph sampling: a jitted prefill, then a `lax.while_loop` decode over a fixed-size cache.

MLA models decode in the absorbed form over the compressed cache (kv_lora_rank + qk_rope_head_dim
values per token and layer); GQA models over a K/V cache. Prompts of different lengths share a
batch (right-padded; each row writes its continuation after its own prompt). Greedy when
temperature is 0, otherwise temperature / top-k / top-p sampling. A row stops at eos or any stop
token (kept in the output) or after max_new_tokens.

Memory and work follow what is live: each prompt is prefilled once and its cache copied to its
samples_per_prompt rows; the loop carries the cache and writes each step's entries in place (no
per-step copy); decode attention reads cache blocks only up to the longest live row; top-p looks
at a bounded top-k of the vocabulary, never sorting all of it.

`generate` returns tokens [N, P + max_new_tokens] (N = prompts x samples_per_prompt), new lengths
[N], and for each generated token log pi(token) under the model's untempered distribution (what
the training forward recomputes).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.models.moe import route_dtype
from r1jax.sharding import state_shardings, use_layout


def pad_prompts(prompts: list[np.ndarray], total_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad prompts into [B, total_len] int32 and their lengths [B]."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.max() > total_len:
        raise ValueError(f"a prompt of {lengths.max()} tokens does not fit a buffer of {total_len}")
    buf = np.full((len(prompts), total_len), pad_id, np.int32)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    return buf, lengths


TOP_P_WIDTH = 1024  # top-p looks at this many most likely tokens (filter_logits)


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float,
                  top_p_width: int = TOP_P_WIDTH) -> jax.Array:
    """Logits [B, V] of the sampling distribution: divide by temperature, keep the top_k largest
    (0: all; ties with the k-th kept), then the nucleus, the smallest set of most likely tokens
    whose probability reaches top_p (1.0: all); the rest -inf.

    No full-vocabulary sort: the nucleus is sought among the w most likely tokens only (one
    `lax.top_k`), w = top_k when top_k is set, else min(top_p_width, V); their probabilities are
    normalised over the whole (top-k-cut) vocabulary. This is exact top-p whenever the nucleus
    has at most w tokens, i.e. the w most likely tokens hold at least top_p of the probability:
    always when top_k is set (the vocabulary left is those k tokens) or w = V. Otherwise the w
    most likely tokens (and any tied with the w-th) are kept, which is top_k = w then top-p: a
    sample never leaves them, and their mass is renormalised over fewer tokens than the nucleus.
    """
    logits = logits.astype(jnp.float32) / temperature
    v = logits.shape[-1]
    top = None  # [B, w]: the w largest logits, descending
    if top_k and top_k < v:
        top = jax.lax.top_k(logits, top_k)[0]
        logits = jnp.where(logits < top[:, -1:], -jnp.inf, logits)
    if top_p < 1.0:
        if top is None:
            top = jax.lax.top_k(logits, min(top_p_width, v))[0]
        probs = jnp.exp(top - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        keep = before < top_p  # always keeps the most likely token
        cutoff = jnp.min(jnp.where(keep, top, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


@flax.struct.dataclass
class SamplerState:
    """The decode loop's carry: everything one step reads and writes (N = rows sampled)."""

    i: jax.Array  # int32: decode steps taken
    tokens: jax.Array  # [N, T] int32: prompts, then each row's continuation after its own prompt
    lengths: jax.Array  # [N] int32: filled positions per row
    done: jax.Array  # [N] bool: the row hit a stop token or its buffer's end
    feed: jax.Array  # [N] int32: the token the next decode step feeds in (each row's last one; 0 when done)
    feed_pos: jax.Array  # [N] int32: its cache slot (0 for a finished row: slot 0 of its own cache, never read)
    cache: dict  # the model's KV cache (Transformer.init_cache), updated in place
    logprobs: jax.Array  # [N, max_new_tokens] float32: log pi of each generated token
    key: jax.Array  # the sampling key
    feed_live: jax.Array  # [N] bool: `feed` is a live row's token (its route is recorded)
    routes: jax.Array | None = None  # [N, T, L_moe, k] (record_routes): experts each fed token selected, -1 unset


def _prefill_shared(model, tokens: jax.Array, lengths: jax.Array, width: int, total: int,
                    samples_per_prompt: int, record_routes: bool = False):
    """Prefill B prompts tokens [B, >= width] once over their first `width` positions, then give
    each of its G = samples_per_prompt rows a copy: returns (logits [B*G, V], a cache of B*G rows x
    `total` positions, and with record_routes the routes buffer [B*G, total, L_moe, k] holding the
    prompt tokens' experts, -1 elsewhere; else None), the rows of one prompt contiguous (row
    b*G + j is sample j of prompt b)."""
    g = samples_per_prompt
    prompt_cache = model.init_cache(tokens.shape[0], width)
    if record_routes:
        out = model.prefill(tokens[:, :width], lengths, prompt_cache, want_routes=True)
    else:
        out = model.prefill(tokens[:, :width], lengths, prompt_cache)
    logits, prompt_cache = out[:2]
    cache = jax.tree.map(
        lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, jnp.repeat(part, g, axis=1), 0, axis=2),
        model.init_cache(tokens.shape[0] * g, total), prompt_cache)
    routes = None
    if record_routes:
        prompt_routes = out[2]  # [B, width, L, k]
        dt = route_dtype(model.cfg.n_routed_experts)
        inside = (jnp.arange(width)[None] < lengths[:, None])[:, :, None, None]
        prompt_routes = jnp.where(inside, prompt_routes, -1).astype(dt)
        routes = jnp.full((tokens.shape[0] * g, total, *prompt_routes.shape[2:]), -1, dt)
        routes = jax.lax.dynamic_update_slice_in_dim(routes, jnp.repeat(prompt_routes, g, axis=0), 0, axis=1)
    return jnp.repeat(logits, g, axis=0), cache, routes


def decode_layout_state(state: nnx.State, mesh) -> nnx.State:
    """`state` resharded once into the decode layout (sharding.DECODE_RULES: experts on the
    expert axis, heads / hidden / vocabulary on tensor, d_model unsplit), for
    `generate(..., layout="decode")`. A new copy where a leaf's sharding changes (the input is
    untouched; drop the copy after sampling); leaves already in that layout are passed through."""
    with use_layout("decode"):
        shardings = state_shardings(state, mesh)
    return jax.device_put(state, shardings)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "stop_ids", "vocab_limit", "samples_per_prompt", "top_p_width",
                                             "layout", "record_routes"))
def generate(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, lengths: jax.Array, rng: jax.Array, *,
             max_new_tokens: int, eos_id: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (), vocab_limit: int = 0, samples_per_prompt: int = 1,
             top_p_width: int = TOP_P_WIDTH, layout: str = "train", record_routes: bool = False) -> dict:
    """See `_generate`; layout "decode" traces the model under sharding.use_layout("decode") (for
    params from `decode_layout_state`: then no weight is all-gathered per decode step)."""
    with use_layout(layout):
        return _generate(graphdef, state, tokens, lengths, rng, max_new_tokens=max_new_tokens, eos_id=eos_id,
                         temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids,
                         vocab_limit=vocab_limit, samples_per_prompt=samples_per_prompt, top_p_width=top_p_width,
                         record_routes=record_routes)


def _generate(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, lengths: jax.Array, rng: jax.Array, *,
              max_new_tokens: int, eos_id: int, temperature: float, top_k: int, top_p: float,
              stop_ids: Sequence[int], vocab_limit: int, samples_per_prompt: int, top_p_width: int,
              record_routes: bool = False) -> dict:
    """Continue right-padded prompts tokens [B, T] (lengths [B]; T >= max prompt + max_new_tokens:
    only the first T - max_new_tokens positions are prefilled), each G = samples_per_prompt times.

    Each prompt is prefilled once and its cache copied to its G rows; the N = B*G rows come out
    grouped (row b*G + j: sample j of prompt b, as GRPO's group advantages expect). G = 1 is the
    plain batch. vocab_limit > 0 never emits ids >= vocab_limit: the model's vocabulary is often
    padded past the tokenizer's (e.g. for sharding), and those rows' logits are not text.
    top_p_width: see `filter_logits`.

    The first new token comes from the prefill's logits, so k new tokens take k - 1 decode steps
    (none for k = 1). The decode loop updates the cache and the token buffer in place (one
    position per row and step) and each step's attention reads the cache only up to the longest
    live row, in blocks of model.attention_block positions.

    record_routes (a MoE model; routing replay): also return "routes" [N, T, L_moe, k]
    (moe.route_dtype), the experts that each token fed to the model selected in each MoE layer:
    the prompt's (prefill) and every generated token but the last (decode), at the token's
    position; -1 where no token was fed (padding, a row's last token).

    Returns {"tokens" [N, T], "lengths" [N], "logprobs" [N, max_new_tokens] (0 past a row's end),
    "num_new" [N]} (+ "routes").
    """
    if isinstance(samples_per_prompt, bool) or not isinstance(samples_per_prompt, int) or samples_per_prompt < 1:
        raise ValueError(f"generate: samples_per_prompt={samples_per_prompt!r}; need an integer >= 1")
    model = nnx.merge(graphdef, state)
    if record_routes and not model.cfg.n_moe_layers:
        raise ValueError("generate: record_routes needs a MoE model (it has no MoE layer)")
    g = samples_per_prompt
    b, t = tokens.shape
    n = b * g
    # Prompts fit in the first T - max_new_tokens positions (the contract above): prefill only those.
    width = t - max_new_tokens if 0 < max_new_tokens < t else t
    with jax.named_scope("prefill"):
        logits, cache, routes = _prefill_shared(model, tokens, lengths, width, t, g, record_routes)
    tokens, lengths = jnp.repeat(tokens, g, axis=0), jnp.repeat(lengths, g, axis=0)
    stops = jnp.asarray([eos_id, *stop_ids], jnp.int32)
    rows = jnp.arange(n)

    def cond(s: SamplerState):
        return (s.i < max_new_tokens) & ~jnp.all(s.done)

    def emit(s: SamplerState, logits: jax.Array) -> SamplerState:
        """Pick each live row's next token from its logits [N, V], write it and its log pi, and
        hand it to the next decode step."""
        key, sub = jax.random.split(s.key)
        allowed = logits
        if 0 < vocab_limit < logits.shape[-1]:
            allowed = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
        if temperature == 0.0:
            nxt = jnp.argmax(allowed, axis=-1).astype(jnp.int32)
        else:
            filtered = filter_logits(allowed, temperature, top_k, top_p, top_p_width)
            nxt = jax.random.categorical(sub, filtered).astype(jnp.int32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), nxt[:, None], -1)[:, 0]
        live = ~s.done & (s.lengths < t)
        nxt = jnp.where(live, nxt, 0)
        # A live row's new token goes to its slot `lengths`; a finished row writes slot 0 of its own
        # cache (never read again), so the attention bound max(pos) follows the live rows only.
        pos = jnp.where(live, s.lengths, 0)
        at = jnp.minimum(s.lengths, t - 1)
        toks = s.tokens.at[rows, at].set(jnp.where(live, nxt, s.tokens[rows, at]), mode="promise_in_bounds",
                                         unique_indices=True)
        logps = s.logprobs.at[:, s.i].set(jnp.where(live, logp, 0.0))
        done = s.done | (live & jnp.isin(nxt, stops)) | (s.lengths + 1 >= t)
        lens = jnp.where(live, s.lengths + 1, s.lengths)
        return s.replace(i=s.i + 1, tokens=toks, lengths=lens, done=done, feed=nxt, feed_pos=pos, logprobs=logps,
                         key=key, feed_live=live)

    def body(s: SamplerState) -> SamplerState:
        if not record_routes:
            logits, cache = model.decode_step(s.feed, s.feed_pos, s.cache)
            return emit(s.replace(cache=cache), logits)
        logits, cache, step_routes = model.decode_step(s.feed, s.feed_pos, s.cache, want_routes=True)
        at = jnp.where(s.feed_live, s.feed_pos, t)  # a finished row's feed is not a token: dropped
        routes = s.routes.at[rows, at].set(step_routes.astype(s.routes.dtype), mode="drop")
        return emit(s.replace(cache=cache, routes=routes), logits)

    zeros = jnp.zeros((n,), jnp.int32)
    state = SamplerState(i=jnp.int32(0), tokens=tokens, lengths=lengths, done=jnp.zeros((n,), bool), feed=zeros,
                         feed_pos=zeros, cache=cache, logprobs=jnp.zeros((n, max_new_tokens), jnp.float32), key=rng,
                         feed_live=jnp.zeros((n,), bool), routes=routes)
    if max_new_tokens > 0:
        # The first new token comes from the prefill's logits; each loop step then decodes the last
        # token and picks the next, so no step decodes a token whose logits go unused.
        state = emit(state, logits)
    with jax.named_scope("decode"):
        final = jax.lax.while_loop(cond, body, state)
    out = {"tokens": final.tokens, "lengths": final.lengths, "logprobs": final.logprobs,
           "num_new": final.lengths - lengths}
    if record_routes:
        out["routes"] = final.routes
    return out
