"""Reward models: a decoder with a scalar head (model.score_head), trained with the Bradley-Terry
loss on preference pairs (R1 section 2.3.4 scores general prompts with such models).

For a pair (chosen c, rejected r) of responses to one prompt, with scores r_c, r_r read at each
response's eos (`Transformer.score`):

    loss = mean over pairs of -log sigmoid(r_c - r_r - m)

(Bradley and Terry 1952; InstructGPT, Ouyang et al. 2022, eq. 1), m the pair's margin (Llama 2,
Touvron et al. 2023, eq. 2: a larger required gap for clearer preferences; rm.margin + the pair's
own "margin"; 0 is the plain loss). Pure functions over the shared train state; the update is
the shared one (train/update.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.sharding import constrain
from r1jax.train.state import StepContext, TrainState
from r1jax.train.update import accumulate_gradients, apply_gradients, balance_term


def bradley_terry_loss(chosen: jax.Array, rejected: jax.Array, margin: jax.Array | float = 0.0) -> jax.Array:
    """Per-pair -log sigmoid(chosen - rejected - margin), float32 [B]."""
    return -jax.nn.log_sigmoid(chosen.astype(jnp.float32) - rejected.astype(jnp.float32) - margin)


def pair_scores(model, batch: dict) -> tuple[jax.Array, jax.Array, dict]:
    """(chosen scores [B], rejected scores [B], the forward's aux) of a batch of PAIR_KEYS, both sides
    in one forward of 2B rows."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    segments = jnp.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]])
    last = jnp.concatenate([batch["chosen_last"], batch["rejected_last"]])
    scores, aux = model.score(tokens, last, None, segments)
    b = batch["chosen_tokens"].shape[0]
    return scores[:b], scores[b:], aux


def _objective(params, bias, batch, norm, *, ctx: StepContext):
    """Summed BT loss of one microbatch over the whole batch's pair count (so microbatches add up),
    plus the MoE balance term; stats that add up over microbatches."""
    model = nnx.merge(ctx.graphdef, params, bias)
    chosen, rejected, aux = pair_scores(model, batch)
    per_pair = bradley_terry_loss(chosen, rejected, batch["margin"] + (ctx.loss or 0.0))
    objective = jnp.sum(per_pair) / norm["pairs"]
    gap = chosen - rejected
    stats = {"pairs_right": jnp.sum((gap > 0).astype(jnp.float32)), "gap_sum": jnp.sum(gap),
             "chosen_sum": jnp.sum(chosen), "rejected_sum": jnp.sum(rejected)}
    if ctx.model.is_moe:
        term, more = balance_term(aux, ctx.balance_loss_coef, norm["micro"])
        objective = objective + term
        stats.update(more)
    return objective, stats


def reward_model_step(state: TrainState, batch: dict, rng: jax.Array, *, ctx: StepContext) -> tuple[TrainState, dict]:
    """One optimizer step of the reward model on a batch of pairs (data/preferences.py PAIR_KEYS),
    over ctx.grad_accum microbatches. ctx.loss is the constant margin (rm.margin). `rng` unused.
    Metrics: loss (mean BT loss), accuracy (share of pairs with r_c > r_r), reward_gap (mean
    r_c - r_r), chosen_score, rejected_score, grad_norm, lr (+ MoE balance metrics)."""
    del rng
    batch = {k: constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in batch.items()}
    n = batch["margin"].shape[0]
    norm = {"pairs": float(n), "micro": float(ctx.grad_accum)}
    grads, totals = accumulate_gradients(lambda p, mb: _objective(p, state.router_bias, mb, norm, ctx=ctx),
                                         state.params, batch, ctx.grad_accum)
    new_state, metrics = apply_gradients(state, grads, totals, ctx=ctx)
    metrics.update(loss=totals["objective"], accuracy=totals["pairs_right"] / n, reward_gap=totals["gap_sum"] / n,
                   chosen_score=totals["chosen_sum"] / n, rejected_score=totals["rejected_sum"] / n)
    return new_state, metrics


def rollout_rows(tokens: jax.Array, prompt_lengths: jax.Array, lengths: jax.Array, view: str, think_end: int,
                 pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What a reward model reads of sampled rollouts, in-graph: (tokens [N, T], segment ids [N, T],
    last [N], the index its score is read at).

    tokens [N, T] hold prompt + response (lengths [N] in all; prompt_lengths [N]). view "response":
    the rows as they are. view "summary": the prompt, then only what follows the response's last
    `think_end` (</think>) token, shifted left to follow the prompt (the whole response when it has
    none): R1 scores helpfulness on the summary."""
    n, t = tokens.shape
    pos = jnp.arange(t)[None]
    if view == "response":
        seg = (pos < lengths[:, None]).astype(jnp.int32)
        return tokens, seg, lengths - 1
    if view != "summary":
        raise ValueError(f"unknown reward-model view {view!r} (response, summary)")
    in_response = (pos >= prompt_lengths[:, None]) & (pos < lengths[:, None])
    end = jnp.max(jnp.where(in_response & (tokens == think_end), pos, -1), axis=1)  # -1: no </think>
    start = jnp.where(end >= 0, end + 1, prompt_lengths)
    new_len = prompt_lengths + lengths - start
    src = jnp.where(pos < prompt_lengths[:, None], pos, start[:, None] + pos - prompt_lengths[:, None])
    rows = jnp.take_along_axis(tokens, jnp.clip(src, 0, t - 1), axis=1)
    valid = pos < new_len[:, None]
    return jnp.where(valid, rows, pad_id), valid.astype(jnp.int32), new_len - 1
