"""Supervised fine-tuning: the pure update function `sft_step(state, batch, rng) -> (state, metrics)`.

A batch is a dict of [B, S] arrays (packed rows):
  tokens       input token ids
  targets      the next token at each position (0 where there is none)
  loss_mask    1 where the target is a trained (completion) token of the same document
  segment_ids  document id within the row, 0 for padding
  positions    position within the document

Objective per step (V3 sections 2.1.2 and 2.2):
  mean token cross-entropy over trained tokens
  + mtp_loss_weight / D * sum_k (mean cross-entropy of MTP depth k)     (if the model has MTP)
  + balance_loss_coef * mean over MoE layers of the sequence-wise balance loss
After the optimizer update, each MoE layer's correction bias moves by
  b_i += bias_update_speed * sign(mean_j load_j - load_i)
using the step's expert loads (the aux-loss-free balancer); biases never receive gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.sharding import constrain
from r1jax.train.losses import chunked_cross_entropy, chunked_mtp_cross_entropy, mtp_targets
from r1jax.train.state import StepContext, TrainState
from r1jax.train.update import accumulate_gradients, apply_gradients, balance_term

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def _objective(params, bias, batch, norm, *, ctx: StepContext):
    """Differentiable objective of one microbatch; `norm` holds the whole batch's token counts so
    that microbatch gradients add up to the full-batch gradient."""
    model = nnx.merge(ctx.graphdef, params, bias)
    chunk = ctx.model.logits_chunk
    h, aux = model(batch["tokens"], batch["positions"], batch["segment_ids"], with_mtp=ctx.mtp, logits=False)
    ce_sum, n = chunked_cross_entropy(h, model.head, batch["targets"], batch["loss_mask"], chunk)
    objective = ce_sum / norm["tokens"]
    stats = {"ce_sum": ce_sum, "tokens": n}
    if ctx.mtp:
        depth = ctx.model.mtp_depth
        t, m = mtp_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"], depth)
        sums = chunked_mtp_cross_entropy(aux["mtp_hidden"], model.head, t, m, chunk)  # [D]
        objective += ctx.model.mtp_loss_weight / depth * jnp.sum(sums / norm["mtp_tokens"])
        stats["mtp_sum"] = sums
    if ctx.model.is_moe:
        term, more = balance_term(aux, ctx.balance_loss_coef, norm["micro"])
        objective += term
        stats.update(more)
        if ctx.mtp:
            stats["mtp_load"] = aux["mtp_load"]
    return objective, stats


def sft_step(state: TrainState, batch: dict, rng: jax.Array, *, ctx: StepContext) -> tuple[TrainState, dict]:
    """One optimizer step of SFT on `batch` (see the module docstring), over ctx.grad_accum
    microbatches. `rng` is unused by the deterministic model today and kept for a uniform
    update-function signature."""
    del rng
    batch = {k: constrain(batch[k], ("batch", "length")) for k in BATCH_KEYS}
    a = ctx.grad_accum
    norm = {"tokens": jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0), "micro": float(a)}
    if ctx.mtp:
        _, m = mtp_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"], ctx.model.mtp_depth)
        norm["mtp_tokens"] = jnp.maximum(jnp.sum(m.astype(jnp.float32), axis=(1, 2)), 1.0)  # [D]
    grads, totals = accumulate_gradients(
        lambda p, mb: _objective(p, state.router_bias, mb, norm, ctx=ctx), state.params, batch, a)

    new_state, metrics = apply_gradients(state, grads, totals, ctx=ctx)
    metrics.update(loss=totals["ce_sum"] / norm["tokens"], objective=totals["objective"], tokens=totals["tokens"],
                   seq_tokens=jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32)))
    if "mtp_sum" in totals:
        metrics["mtp_loss"] = jnp.mean(totals["mtp_sum"] / norm["mtp_tokens"])
    return new_state, metrics
