"""Losses as small pure functions: token cross-entropy, MTP targets, the GRPO family (distillation's
divergences live in train/distill.py).

Each loss on logits [..., V] has a chunked form on hidden states (`head_chunks`): the model runs with
`logits=False`, and the output head, log-softmax and the per-token terms run over sequence chunks of
`model.logits_chunk` tokens under jax.checkpoint, so no [B, S, vocab] array exists forward or backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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


def head_chunks(fn: Callable[..., Any], head: Callable[[jax.Array], jax.Array], h: jax.Array,
                xs: tuple[jax.Array, ...], chunk: int, saved: tuple[str, ...] = ()) -> Any:
    """fn(head(h), *xs) computed over sequence chunks: per-position outputs without [B, S, vocab].

    h [B, S, d_model]: hidden states (the model's `logits=False` output); head: [B, C, d_model] ->
    [B, C, V] float32 logits (e.g. `Transformer.head`; it may close over the params being
    differentiated); xs: per-position arrays [B, S, ...] cut into the same chunks (targets, masks,
    a second model's hidden states); fn(logits [B, C, V], *xs_chunk) -> a pytree of per-position
    outputs [B, C, ...]. Returns that pytree over the whole sequence, [B, S, ...].

    chunk <= 0 or chunk >= S: one call on the whole sequence (the plain path, [B, S, V] logits).
    Otherwise S is zero-padded to a multiple of chunk (the padding's outputs are dropped) and a
    lax.scan runs head + fn chunk by chunk under jax.checkpoint: the forward holds one [B, C, V]
    block at a time and the backward recomputes each chunk's logits from its hidden states (one
    more head matmul) instead of keeping them. `saved`: names (jax.ad_checkpoint.checkpoint_name)
    of values inside fn the backward keeps rather than recomputes (they are stacked over chunks,
    so they must be small, e.g. a teacher's top-k).
    """
    b, s = h.shape[:2]
    if chunk <= 0 or chunk >= s:
        return fn(head(h), *xs)
    n = -(-s // chunk)

    def split(x):  # [B, S, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, n * chunk - s)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    policy = (jax.checkpoint_policies.save_only_these_names(*saved) if saved
              else jax.checkpoint_policies.nothing_saveable)

    @functools.partial(jax.checkpoint, policy=policy, prevent_cse=False)
    def body(carry, inputs):
        h_c, *xs_c = inputs
        return carry, fn(head(h_c), *xs_c)

    _, ys = jax.lax.scan(body, None, (split(h), *map(split, xs)))
    return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(b, n * chunk, *y.shape[3:])[:, :s], ys)


def chunked_cross_entropy(h: jax.Array, head: Callable[[jax.Array], jax.Array], targets: jax.Array,
                          mask: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """`token_cross_entropy` of head(h) without [B, S, vocab]: h [B, S, d_model], targets and mask
    [B, S]; chunk as in `head_chunks`. Returns (summed cross-entropy over mask, sum of mask)."""
    ce = head_chunks(per_token_cross_entropy, head, h, (targets,), chunk)  # [B, S]
    m = mask.astype(jnp.float32)
    return jnp.sum(ce * m), jnp.sum(m)


def chunked_mtp_cross_entropy(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], targets: jax.Array,
                              mask: jax.Array, chunk: int) -> jax.Array:
    """Summed cross-entropy of each MTP depth [D]: hidden [D, B, S, d_model] (the model's
    `mtp_hidden`), targets and mask [D, B, S] (`mtp_targets`); the shared head runs over sequence
    chunks of `chunk` tokens (`head_chunks`) on the depths stacked as rows [D * B, S]."""
    d, b, s = targets.shape
    ce = head_chunks(per_token_cross_entropy, head, hidden.reshape(d * b, s, -1), (targets.reshape(d * b, s),), chunk)
    return jnp.sum(ce.reshape(d, b, s) * mask.astype(jnp.float32), axis=(1, 2))


def chunked_sampled_logprobs(h: jax.Array, head: Callable[[jax.Array], jax.Array], targets: jax.Array,
                             chunk: int) -> tuple[jax.Array, jax.Array]:
    """`sampled_logprobs` of head(h) without [B, S, vocab]: h [B, S, d_model], targets [B, S] ->
    (log pi(target) [B, S], entropy [B, S]), float32. The entropy is a statistic here: it carries
    no gradient (so the backward spends nothing on it)."""

    def fn(logits, t):
        logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        logp = jnp.take_along_axis(logp_all, t[..., None], axis=-1)[..., 0]
        lp = jax.lax.stop_gradient(logp_all)
        return logp, -jnp.sum(jnp.exp(lp) * lp, axis=-1)

    return head_chunks(fn, head, h, (targets,), chunk)


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


# --------------------------------------------------------------------------------------------------
# GRPO family (DeepSeekMath eqs. 3-4; DAPO; Dr. GRPO; GSPO)
# --------------------------------------------------------------------------------------------------

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def group_advantages(rewards: jax.Array, group_size: int, *, std_normalize: bool = True,
                     leave_one_out: bool = False, std_over: str = "group", strata=None,
                     eps: float = 1e-6) -> jax.Array:
    """Outcome advantages of G samples per prompt, rewards [N * G] (groups contiguous) -> [N * G].

    GRPO (DeepSeekMath section 4.1.2): A_i = (r_i - mean(r)) / std(r).
    Dr. GRPO (std_normalize=False): A_i = r_i - mean(r).
    std is the population standard deviation of the group (ddof 0, divided by G, not G - 1):
    DeepSeekMath's formula writes std(r) without saying which, and this is the one numpy and
    jnp.std compute by default (TRL computes the sample std, ddof 1, instead).
    leave_one_out (RLOO baseline): A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r)),
    divided by std(r) too when std_normalize.
    std_over="batch" (REINFORCE++-baseline's normalisation): the centred rewards r_i - mean(r) are
    divided by their population std over every rollout of the batch of the same stratum (`strata`,
    host ints [N * G], constant within a group, e.g. the prompt's scenario; None: one stratum), not
    by the group's own std. A group whose rewards differ only a little (a reward model's scores of
    samples that are all as good) then keeps small advantages instead of being scaled up to +-1.
    """
    r = rewards.reshape(-1, group_size).astype(jnp.float32)
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    adv = centred * (group_size / (group_size - 1)) if leave_one_out else centred
    if std_normalize and std_over == "group":
        adv = adv / (jnp.std(r, axis=1, keepdims=True) + eps)
    elif std_normalize and std_over == "batch":
        flat = centred.reshape(-1)
        labels = np.zeros(flat.shape[0], np.int64) if strata is None else np.asarray(strata).reshape(-1)
        if labels.shape != flat.shape:
            raise ValueError(f"strata has {labels.size} entries for {flat.shape[0]} rewards")
        std = jnp.zeros_like(flat)
        for k in np.unique(labels):
            m = jnp.asarray(labels == k)
            std = jnp.where(m, jnp.sqrt(jnp.sum(jnp.where(m, flat, 0.0) ** 2) / jnp.sum(m)), std)
        adv = adv / (std.reshape(adv.shape) + eps)
    elif std_normalize:
        raise ValueError(f"std_over must be 'group' or 'batch', got {std_over!r}")
    return adv.reshape(-1)


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs (Schulman 2020).

    k1 = log pi - log pi_ref; k2 = (log pi - log pi_ref)^2 / 2;
    k3 = pi_ref / pi - log(pi_ref / pi) - 1 (DeepSeekMath eq. 4, unbiased and >= 0).
    """
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return jnp.exp(-d) + d - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r} (known: {', '.join(KL_ESTIMATORS)})")


def overlong_penalty(lengths: jax.Array, max_len: int, cache_len: int) -> jax.Array:
    """DAPO's soft overlong punishment (eq. 13): 0 up to max_len - cache_len, then a linear ramp to
    -1 at max_len, and -1 beyond."""
    start = max_len - cache_len
    ramp = (start - lengths.astype(jnp.float32)) / max(cache_len, 1)
    return jnp.where(lengths <= start, 0.0, jnp.where(lengths <= max_len, ramp, -1.0))


def aggregate_norm(mask: jax.Array) -> dict:
    """The denominators `aggregate` divides by, of a whole batch: {"seqs": sequences with response
    tokens, "tokens": response tokens}, each at least 1. mask [B, T]."""
    lens = jnp.sum(mask.astype(jnp.float32), axis=-1)
    return {"seqs": jnp.maximum(jnp.sum((lens > 0).astype(jnp.float32)), 1.0), "tokens": jnp.maximum(jnp.sum(lens), 1.0)}


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str, max_len: int, norm: dict | None = None) -> jax.Array:
    """Reduce a per-token loss [B, T] over response tokens (mask [B, T]) to a scalar.

    seq-mean-token-mean (DeepSeekMath eq. 3): mean_i ( 1/|o_i| sum_t l_it )
    token-mean (DAPO eq. 8): sum_{i,t} l_it / sum_i |o_i|
    seq-mean-token-sum-norm (Dr. GRPO): mean_i ( sum_t l_it / max_len )
    Sequences with no response tokens count in none of them. `norm`: the whole batch's
    `aggregate_norm` when the rows are one microbatch of it (the microbatch results then add up to
    the batch's); default: these rows' own.
    """
    m = mask.astype(jnp.float32)
    lens = jnp.sum(m, axis=-1)
    has = (lens > 0).astype(jnp.float32)
    norm = norm if norm is not None else aggregate_norm(mask)
    sums = jnp.sum(per_token * m, axis=-1)
    if mode == "seq-mean-token-mean":
        return jnp.sum(has * sums / jnp.maximum(lens, 1.0)) / norm["seqs"]
    if mode == "token-mean":
        return jnp.sum(sums) / norm["tokens"]
    if mode == "seq-mean-token-sum-norm":
        return jnp.sum(has * sums / max_len) / norm["seqs"]
    raise ValueError(f"unknown aggregation {mode!r} (known: {', '.join(AGGREGATIONS)})")


MISMATCH_MODES = ("off", "tis", "token_mask", "sequence_mask")


def importance_weights(old_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, mode: str,
                       cap: float) -> tuple[jax.Array, dict]:
    """Per-token weights [B, T] that correct for the sampler not being the policy that trains.

    w_t = pi_old(y_t) / pi_sampler(y_t) = exp(old_logp - sampler_logp) over the response tokens
    (old_logp: the training forward's; sampler_logp: what the sampler drew with), constants of the
    update. mode:
      off            1 (no correction);
      tis            min(w_t, cap): truncated importance sampling (Ionides 2008; Yao et al. 2025,
                     "Your efficient RL framework secretly brings you off-policy RL training");
      token_mask     1 where 1/cap <= w_t <= cap, else 0 (the token leaves the loss);
      sequence_mask  1 for every token of a sequence whose geometric-mean ratio
                     exp(mean_t log w_t) lies in [1/cap, cap], else 0 for the whole sequence.
    Outside `mask` the weight is 0. Stats over response tokens: is_ratio_mean, is_ratio_max (of
    w_t), is_corrected_share (tis: tokens truncated; masks: tokens masked).
    """
    if mode not in MISMATCH_MODES:
        raise ValueError(f"unknown mismatch correction {mode!r} (known: {', '.join(MISMATCH_MODES)})")
    m = mask.astype(jnp.float32)
    log_w = jnp.where(m > 0, old_logp - sampler_logp, 0.0)
    w = jnp.exp(log_w)
    if mode == "tis":
        weights, corrected = jnp.minimum(w, cap), (w > cap)
    elif mode == "token_mask":
        keep = (w >= 1.0 / cap) & (w <= cap)
        weights, corrected = keep.astype(jnp.float32), ~keep
    elif mode == "sequence_mask":
        seq = jnp.exp(jnp.sum(log_w, -1) / jnp.maximum(jnp.sum(m, -1), 1.0))
        keep = ((seq >= 1.0 / cap) & (seq <= cap))[:, None]
        weights, corrected = jnp.broadcast_to(keep, w.shape).astype(jnp.float32), jnp.broadcast_to(~keep, w.shape)
    else:
        weights, corrected = jnp.ones_like(w), jnp.zeros(w.shape, jnp.bool_)
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    stats = {"is_ratio_mean": jnp.sum(w * m) / tokens, "is_ratio_max": jnp.max(jnp.where(m > 0, w, 0.0)),
             "is_corrected_share": jnp.sum(corrected.astype(jnp.float32) * m) / tokens}
    return jax.lax.stop_gradient(weights * m), stats


def policy_objective(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                     clip_low: float, clip_high: float, ratio_level: str = "token",
                     ref_logp: jax.Array | None = None, beta: float = 0.0, kl: str = "k3",
                     aggregation: str = "seq-mean-token-mean", max_len: int = 1,
                     norm: dict | None = None, is_weight: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """GRPO loss to minimise (the negated objective) and its statistics.

    logp, old_logp, ref_logp [B, T]: log-probs of the sampled tokens under pi_theta, pi_old, pi_ref;
    advantages [B] (one per sequence, outcome supervision); mask [B, T] response tokens.

    token ratio (GRPO/DAPO): r_it = pi_theta / pi_old per token;
    sequence ratio (GSPO): s_i = exp(mean_t log(pi_theta / pi_old)), shared by the sequence's tokens.
    l_it = -w_it min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + beta * KL_it, aggregated by
    `aggregation`; w_it = is_weight (`importance_weights`: the sampler/trainer mismatch correction),
    1 without it. The KL term is not reweighted.
    norm: the whole batch's `aggregate_norm` when these rows are one microbatch of it (the loss and
    the token-mean statistics then add up over microbatches); default: these rows' own.
    """
    norm = norm if norm is not None else aggregate_norm(mask)
    m = mask.astype(jnp.float32)
    log_ratio = (logp - old_logp) * m
    if ratio_level == "sequence":
        seq = jnp.sum(log_ratio, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)
        log_ratio = jnp.broadcast_to(seq[:, None], logp.shape)
    elif ratio_level != "token":
        raise ValueError(f"unknown ratio level {ratio_level!r} (token, sequence)")
    ratio = jnp.exp(log_ratio)
    adv = advantages[:, None].astype(jnp.float32)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -jnp.minimum(unclipped, clipped)
    if is_weight is not None:
        per_token = per_token * is_weight
    stats = {"clip_fraction": jnp.sum((clipped < unclipped).astype(jnp.float32) * m) / norm["tokens"]}
    if beta:
        # Positions outside the mask may hold any log-probs (e.g. unpacked padding): keep them finite.
        kl_t = kl_estimate(jnp.where(m > 0, logp, 0.0), jnp.where(m > 0, ref_logp, 0.0), kl)
        per_token = per_token + beta * kl_t
        stats["kl"] = jnp.sum(kl_t * m) / norm["tokens"]
    return aggregate(per_token, mask, aggregation, max_len, norm), stats


def sampled_logprobs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log pi(target) [B, T] and the entropy of pi [B, T] from logits [B, T, V] (float32)."""
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy
