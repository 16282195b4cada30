"""GRPO (DeepSeekMath section 4.1, DeepSeek-R1 section 2.2): the pure update `grpo_step` and the
pure pieces of an iteration. The iteration itself (rollout -> score -> advantages and masks ->
log-prob passes -> updates -> metrics) is `r1jax.stages.grpo.GRPOIteration`.

A GRPO batch for `grpo_step` is a dict of arrays over B sampled sequences (prompt + response in
one row, right-padded):
  tokens, positions, segment_ids, targets   as in SFT (segment 1 for real tokens, 0 for padding)
  response_mask [B, S]   1 where the target is a sampled response token of a kept group
  old_logp [B, S]        log pi_old(target), from the training forward before the inner updates
  ref_logp [B, S]        log pi_ref(target) (only with beta > 0)
  advantages [B]         group-relative advantages (see losses.group_advantages)

The update computes log pi_theta(target) with the training forward (MTP off), the clipped
surrogate with clip-low/high (token or GSPO sequence ratio), the KL penalty, the chosen loss
aggregation, plus the MoE sequence balance loss, over ctx.grad_accum microbatches, then one
optimizer step; MoE correction biases keep moving with the step's expert loads, as in SFT.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.config import Config
from r1jax.sharding import constrain
from r1jax.train.losses import aggregate_norm, chunked_sampled_logprobs, group_advantages, policy_objective
from r1jax.train.state import StepContext, TrainState
from r1jax.train.update import accumulate_gradients, apply_gradients, balance_term, microbatches

GRPO_KEYS = ("tokens", "positions", "segment_ids", "targets", "response_mask", "old_logp", "advantages")


@dataclasses.dataclass(frozen=True)
class GRPOLoss:
    """The hyperparameters of the GRPO objective (`losses.policy_objective`): StepContext.loss of
    grpo_step."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    ratio_level: str = "token"  # token | sequence (GSPO)
    beta: float = 0.0  # KL coefficient; 0: no reference
    kl_estimator: str = "k3"
    aggregation: str = "seq-mean-token-mean"
    max_len: int = 1  # Dr. GRPO's constant length (the rollouts' max_new_tokens)
    mismatch: str = "off"  # sampler/trainer mismatch correction (losses.importance_weights)
    mismatch_cap: float = 2.0

    @classmethod
    def from_config(cls, cfg: Config) -> GRPOLoss:
        g = cfg.grpo
        return cls(clip_low=g.clip_low, clip_high=g.clip_high, ratio_level=g.ratio_level, beta=g.beta,
                   kl_estimator=g.kl_estimator, aggregation=g.aggregation, max_len=cfg.sampling.max_new_tokens,
                   mismatch=g.mismatch, mismatch_cap=g.mismatch_cap)


def _objective(params, bias, batch, norm, *, ctx: StepContext):
    """The GRPO loss of one microbatch; `norm` holds the whole minibatch's counts (aggregate_norm,
    "micro") so that the microbatch losses and statistics add up to the minibatch's."""
    loss_cfg: GRPOLoss = ctx.loss
    model = nnx.merge(ctx.graphdef, params, bias)
    h, aux = model(batch["tokens"], batch["positions"], batch["segment_ids"], logits=False,
                   routes=batch.get("routes"))
    logp, entropy = chunked_sampled_logprobs(h, model.head, batch["targets"], ctx.model.logits_chunk)
    loss, stats = policy_objective(
        logp, batch["old_logp"], batch["advantages"], batch["response_mask"], clip_low=loss_cfg.clip_low,
        clip_high=loss_cfg.clip_high, ratio_level=loss_cfg.ratio_level, ref_logp=batch.get("ref_logp"),
        beta=loss_cfg.beta, kl=loss_cfg.kl_estimator, aggregation=loss_cfg.aggregation, max_len=loss_cfg.max_len,
        norm=norm, is_weight=batch.get("is_weight"))
    m = batch["response_mask"].astype(jnp.float32)
    stats["entropy"] = jnp.sum(entropy * m) / norm["tokens"]  # no gradient (chunked_sampled_logprobs)
    stats["policy_loss"] = loss
    if ctx.model.is_moe:
        term, more = balance_term(aux, ctx.balance_loss_coef, norm["micro"])
        loss = loss + term
        stats.update(more)
    if "route_flips" in aux:  # routing replay: counts, added up over the microbatches
        stats["route_flips"], stats["route_replayed"] = jnp.sum(aux["route_flips"]), jnp.sum(aux["route_replayed"])
    return loss, stats


def grpo_step(state: TrainState, batch: dict, rng: jax.Array, *, ctx: StepContext) -> tuple[TrainState, dict]:
    """One optimizer step on a GRPO (mini)batch, accumulated over ctx.grad_accum microbatches (the
    loss is normalised by the whole minibatch's counts, so any accumulation gives the same step).
    `rng` is unused (deterministic forward). Metrics: loss, policy_loss, clip_fraction, entropy
    (+ kl with beta > 0), grad_norm, lr (+ balance_loss, load_max_over_mean, moe_extra_rounds for MoE;
    + routing_flips with routing replay: the share of replayed (token, MoE layer) selections that
    the policy's own router would have chosen differently).

    batch["routes"] [B, S, L_moe, k] (optional): routing replay, the experts every token selects
    (models.transformer.Transformer `routes`)."""
    del rng
    batch = {k: constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in batch.items()}
    a = ctx.grad_accum
    norm = dict(aggregate_norm(batch["response_mask"]), micro=float(a))
    grads, totals = accumulate_gradients(lambda p, mb: _objective(p, state.router_bias, mb, norm, ctx=ctx),
                                         state.params, batch, a)
    new_state, metrics = apply_gradients(state, grads, totals, ctx=ctx)
    flips, replayed = totals.pop("route_flips", None), totals.pop("route_replayed", None)
    if flips is not None:
        metrics["routing_flips"] = flips / jnp.maximum(replayed, 1.0)
    metrics.update(loss=totals["objective"], **{k: v for k, v in totals.items() if k not in ("objective", "balance",
                                                                                           "load")})
    return new_state, metrics


PASS_KEYS = ("tokens", "positions", "segment_ids", "targets")


def token_logprobs(params: nnx.State, bias: nnx.State, batch: dict, *, ctx: StepContext,
                   micro: int | None = None, return_aux: bool = False):
    """log pi(target) [B, S] under `params` (the training forward, no MTP): pi_old and pi_ref.

    batch: tokens, positions, segment_ids, targets [B, S] (rollout rows, or packed ones: see
    `pack_rollouts`), optionally routes [B, S, L_moe, k] (routing replay). The rows run in `micro` microbatches (default ctx.grad_accum; it must divide
    B), one after another (lax.map over `update.microbatches`' interleaved split), so the pass
    holds one microbatch's activations; the head runs in chunks of model.logits_chunk tokens
    (`losses.chunked_sampled_logprobs`), so no [B, S, vocab] array exists either.

    return_aux: return (log-probs, counts), counts {"route_flips", "route_replayed"} summed over
    layers and rows with routes in the batch (the replayed selections this forward's own router
    would have made differently; all replayed ones), else {}.
    """
    model = nnx.merge(ctx.graphdef, params, bias)
    n = ctx.grad_accum if micro is None else micro
    b = batch["tokens"].shape[0]
    if b % n:
        raise ValueError(f"{n} log-prob microbatches do not divide {b} rows")

    def one(mb):
        h, aux = model(mb["tokens"], mb["positions"], mb["segment_ids"], logits=False, routes=mb.get("routes"))
        counts = {k: jnp.sum(aux[k]) for k in ("route_flips", "route_replayed") if k in aux}
        return chunked_sampled_logprobs(h, model.head, mb["targets"], ctx.model.logits_chunk)[0], counts

    rows = {k: batch[k] for k in PASS_KEYS + (("routes",) if "routes" in batch else ())}
    if n == 1:
        logp, counts = one(rows)
    else:
        out, counts = jax.lax.map(one, microbatches(rows, n))  # [n, B / n, S]; microbatch j: rows j, j + n, ...
        logp = constrain(out.swapaxes(0, 1).reshape(b, *out.shape[2:]), ("batch", None))
        counts = {k: jnp.sum(v) for k, v in counts.items()}
    return (logp, counts) if return_aux else logp


def rollout_batch(tokens: jax.Array, prompt_lengths: jax.Array, total_lengths: jax.Array) -> dict:
    """Training rows from sampled sequences: tokens [B, T] with prompt + response, prompt_lengths and
    total_lengths [B] -> tokens, positions, segment_ids, targets, response_mask ([B, T])."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = pos < total_lengths[:, None]
    targets = jnp.where(pos + 1 < total_lengths[:, None], jnp.roll(tokens, -1, axis=1), 0)
    response = (pos + 1 >= prompt_lengths[:, None]) & (pos + 1 < total_lengths[:, None])
    return {"tokens": tokens, "positions": pos, "segment_ids": valid.astype(jnp.int32), "targets": targets,
            "response_mask": response.astype(jnp.float32)}


# --------------------------------------------------------------------------------------------------
# Packed log-prob passes: rollouts packed by their actual length (SFT's packing conventions)
# --------------------------------------------------------------------------------------------------


def pack_plan(lengths: np.ndarray, width: int, multiple: int) -> dict | None:
    """Where each of N rollouts (rows of `width` tokens, the first lengths[i] real) goes when they
    are packed several to a row, first-fit in decreasing length, into R rows of `width` tokens.

    R is the smallest multiple * 2^k rows that holds them (so the passes' shapes, and their
    compiled programs, come from a short list; `multiple` = microbatches x batch shards). None
    when R would not be below N (packing saves nothing). Host numpy in, host numpy out:
      src [R, width] int32: flat index i * width + t of the rollout token in each packed slot, -1 padding;
      segment_ids [R, width] int32: 1, 2, ... per rollout within a row, 0 padding (SFT's convention);
      positions [R, width] int32: position within the rollout (restarting at 0 for each);
      unpack [N, width] int32: flat index r * width + o + t of rollout i's position t, -1 for
        t >= lengths[i] (`unpack_rows` gives those positions 0).
    """
    lengths = np.asarray(lengths, np.int64)
    n = len(lengths)
    order = np.argsort(-lengths, kind="stable")
    rows = multiple
    while rows < n:
        free, place = np.full(rows, width, np.int64), np.zeros((n, 2), np.int64)  # place: (row, offset)
        for i in order:
            fits = np.flatnonzero(free >= lengths[i])
            if not len(fits):
                break
            r = fits[0]
            place[i] = (r, width - free[r])
            free[r] -= lengths[i]
        else:
            return _plan_arrays(lengths, place, rows, width)
        rows *= 2
    return None


def _plan_arrays(lengths: np.ndarray, place: np.ndarray, rows: int, width: int) -> dict:
    src = np.full((rows, width), -1, np.int32)
    seg = np.zeros((rows, width), np.int32)
    pos = np.zeros((rows, width), np.int32)
    unpack = np.full((len(lengths), width), -1, np.int32)
    count = np.zeros(rows, np.int32)
    for i in np.lexsort((place[:, 1], place[:, 0])):  # by row, then offset: segment ids in row order
        (r, o), n = place[i], lengths[i]
        count[r] += 1
        src[r, o:o + n] = i * width + np.arange(n)
        seg[r, o:o + n] = count[r]
        pos[r, o:o + n] = np.arange(n)
        unpack[i, :n] = r * width + o + np.arange(n)
    return {"src": src, "segment_ids": seg, "positions": pos, "unpack": unpack}


def packed_rows(rows: dict, plan: dict) -> dict:
    """The log-prob passes' input rows from `rollout_batch` rows [N, T] and a `pack_plan` (as
    arrays): tokens, targets (each rollout's own next token, 0 at its end, as unpacked), positions
    and segment_ids, all [R, T]; and when `rows` hold routes [N, T, L, k] (routing replay), theirs
    [R, T, L, k] (-1 in padding)."""
    src = plan["src"]
    take = lambda x: jnp.where(src >= 0, x.reshape(-1)[jnp.maximum(src, 0)], 0)  # noqa: E731
    out = {"tokens": take(rows["tokens"]), "targets": take(rows["targets"]), "positions": plan["positions"],
           "segment_ids": plan["segment_ids"]}
    if "routes" in rows:
        r = rows["routes"]
        flat = r.reshape(-1, *r.shape[2:])[jnp.maximum(src, 0)]  # [R, T, L, k]
        out["routes"] = jnp.where((src >= 0)[..., None, None], flat, jnp.asarray(-1, r.dtype))
    return out


def unpack_rows(values: jax.Array, plan: dict) -> jax.Array:
    """Per-token values of packed rows [R, T] back in the rollout layout [N, T] (0 past each
    rollout's end), where advantages, masks and the update read them."""
    idx = plan["unpack"]
    return jnp.where(idx >= 0, values.reshape(-1)[jnp.maximum(idx, 0)], 0.0)


def advantages_and_masks(total: np.ndarray, group_size: int, *, std_normalize: bool = True,
                         leave_one_out: bool = False, dynamic_sampling: bool = False, beta: float = 0.0,
                         std_over: str = "group", strata: np.ndarray | None = None) -> dict:
    """Per-rollout training weights from the rollouts' total rewards [N * G] (groups contiguous).

    `strata` [N*G] (e.g. the rows' scenarios) are the std's strata with std_over="batch".
    Returns {"advantages" [N*G] (losses.group_advantages), "keep" [N] (a group carries signal: with
    dynamic_sampling (DAPO), False for a group whose rewards are all equal), "row_keep" [N*G] float
    (keep per row), "useful" [N*G] bool (a row that can move the policy: kept, and a non-zero
    advantage or a KL term)}."""
    adv = np.asarray(group_advantages(jnp.asarray(total), group_size, std_normalize=std_normalize,
                                      leave_one_out=leave_one_out, std_over=std_over, strata=strata))
    groups = np.asarray(total).reshape(-1, group_size)
    keep = np.ones(len(groups), bool)
    if dynamic_sampling:
        keep = groups.max(1) > groups.min(1)
    row_keep = np.repeat(keep, group_size).astype(np.float32)
    useful = (row_keep > 0) & ((adv != 0) | (beta > 0))
    return {"advantages": adv, "keep": keep, "row_keep": row_keep, "useful": useful}


def minibatch_plan(n_rows: int, minibatches: int, inner_epochs: int, seed: int, iteration: int) -> list[np.ndarray]:
    """The row indices of each update of an iteration: inner_epochs passes, each a fresh permutation
    (from (seed, iteration)) cut into `minibatches` equal parts."""
    rng = np.random.default_rng([seed, iteration])
    mb = n_rows // minibatches
    plan = []
    for _ in range(inner_epochs):
        perm = rng.permutation(n_rows)
        plan += [perm[k * mb:(k + 1) * mb] for k in range(minibatches)]
    return plan


# --------------------------------------------------------------------------------------------------
# What a GRPO stage checkpoints
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class GRPOState:
    """What a GRPO run checkpoints. Field names extend TrainState's, so a later stage hands off from
    a GRPO checkpoint exactly as from an SFT one (it reads params and router_bias)."""

    step: jax.Array  # int32: GRPO iterations done (the loop's step; train.steps counts these)
    opt_step: jax.Array  # int32: optimizer steps taken (inner_epochs x minibatches per iteration)
    params: nnx.State
    opt_state: Any
    router_bias: nnx.State
    ref_params: Any = None  # frozen reference policy (None when beta == 0: no copy is kept)

    def train_state(self) -> TrainState:
        return TrainState(step=self.opt_step, params=self.params, opt_state=self.opt_state,
                          router_bias=self.router_bias)


def grpo_wrap(beta: float):
    """start_stage's `wrap`: TrainState -> GRPOState (a reference copy of the params when beta > 0)."""

    def wrap(ts: TrainState, copy) -> GRPOState:
        return GRPOState(step=ts.step, opt_step=copy(ts.step), params=ts.params, opt_state=ts.opt_state,
                         router_bias=ts.router_bias, ref_params=copy(ts.params) if beta > 0 else None)

    return wrap


def prompt_indices(n_records: int, seed: int, iteration: int, n: int) -> np.ndarray:
    """Record indices of iteration `iteration`'s n prompts: a fresh permutation of the source per
    epoch, computed from (seed, epoch) alone, so a resumed run draws exactly the same prompts."""
    flat = np.arange(iteration * n, (iteration + 1) * n)
    epochs, pos = flat // n_records, flat % n_records
    out = np.empty(n, np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n_records)
        out[epochs == e] = perm[pos[epochs == e]]
    return out
