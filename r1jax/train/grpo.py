"""GRPO: the pure update `grpo_step(state, batch, rng) -> (state, metrics)` and its helpers.

A GRPO batch is a dict of arrays over B = prompts x G sampled sequences (prompt + response in one
row, right-padded):
  tokens, positions, segment_ids, targets   as in SFT (segment 1 for real tokens, 0 for padding)
  response_mask [B, S]   1 where the target is a sampled response token
  old_logp [B, S]        log pi_old(target), from the training forward before the inner updates
  ref_logp [B, S]        log pi_ref(target) (only with beta > 0)
  advantages [B]         group-relative advantages (see losses.group_advantages)

The update computes log pi_theta(target) with the training forward (MTP off), the clipped
surrogate with clip-low/high (token or GSPO sequence ratio), the KL penalty, the chosen loss
aggregation, plus the MoE sequence balance loss, then one optimizer step; MoE correction biases
keep moving with the step's expert loads, as in SFT.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from r1jax.sharding import constrain
from r1jax.train.losses import policy_objective, sampled_logprobs
from r1jax.train.sft import update_router_bias
from r1jax.train.state import StepContext, TrainState

GRPO_KEYS = ("tokens", "positions", "segment_ids", "targets", "response_mask", "old_logp", "advantages")


def _objective(params, bias, batch, *, ctx: StepContext):
    cfg, g = ctx.cfg, ctx.cfg.grpo
    model = nnx.merge(ctx.graphdef, params, bias)
    logits, aux = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    logp, entropy = sampled_logprobs(logits, batch["targets"])
    loss, stats = policy_objective(
        logp, batch["old_logp"], batch["advantages"], batch["response_mask"], clip_low=g.clip_low,
        clip_high=g.clip_high, ratio_level=g.ratio_level, ref_logp=batch.get("ref_logp"), beta=g.beta,
        kl=g.kl_estimator, aggregation=g.aggregation, max_len=g.max_new_tokens)
    m = batch["response_mask"].astype(jnp.float32)
    stats["entropy"] = jnp.sum(jax.lax.stop_gradient(entropy) * m) / jnp.maximum(jnp.sum(m), 1.0)
    stats["policy_loss"] = loss
    if cfg.model.is_moe:
        balance = jnp.mean(aux["balance_loss"])
        loss = loss + cfg.train.balance_loss_coef * balance
        stats["balance_loss"], stats["load"] = balance, aux["moe_load"]
    return loss, stats


def grpo_step(state: TrainState, batch: dict, rng: jax.Array, *, ctx: StepContext) -> tuple[TrainState, dict]:
    """One optimizer step on a GRPO (mini)batch. `rng` is unused (deterministic forward)."""
    del rng
    batch = {k: constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in batch.items()}
    (loss, stats), grads = jax.value_and_grad(_objective, has_aux=True)(state.params, state.router_bias, batch, ctx=ctx)
    updates, opt_state = ctx.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    bias = state.router_bias
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": ctx.schedule(state.step),
               **{k: v for k, v in stats.items() if k != "load"}}
    if ctx.cfg.model.is_moe:
        bias = update_router_bias(bias, {"moe": stats["load"]}, ctx.cfg.train.bias_update_speed)
        load = stats["load"]
        metrics["load_max_over_mean"] = jnp.mean(jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1e-9))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, router_bias=bias), metrics


def token_logprobs(params: nnx.State, bias: nnx.State, batch: dict, *, ctx: StepContext) -> jax.Array:
    """log pi(target) [B, S] under `params` (the training forward, no MTP): pi_old and pi_ref."""
    model = nnx.merge(ctx.graphdef, params, bias)
    logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    return sampled_logprobs(logits, batch["targets"])[0]


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
