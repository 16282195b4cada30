"""What the SFT, GRPO and distillation updates share: microbatched gradients, the MoE balance term,
the aux-loss-free router-bias rule with its load metric, and the optimizer step.

An update function (`sft_step`, `grpo_step`, `distill_step`) is
    step(state, batch, rng, *, ctx) -> (state, metrics)
and builds on three pieces of this module:

  accumulate_gradients(loss_fn, params, batch, n)
      loss_fn(params, microbatch) -> (objective, stats) over n microbatches of the batch; the
      objective is normalised by whole-batch counts, so the microbatch gradients (summed here in
      float32) are the full-batch gradient;
  balance_term(aux, coef, n)
      the MoE sequence-wise balance loss (DeepSeek-V3 eq. 17) as a term of a microbatch objective;
  apply_gradients(state, grads, totals, ctx=ctx)
      the optax step (float32 Adam, state.make_optimizer), the params moved by apply_updates
      (p + u in float32, rounded to the param dtype to nearest or stochastically), then each MoE
      layer's correction bias moved by the step's expert loads:
      b_i += gamma * sign(mean_j load_j - load_i)   (V3 section 2.1.2; biases get no gradient).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.sharding import constrain
from r1jax.train.state import StepContext, TrainState, global_norm


def microbatches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...], microbatch j holding rows j, j+n, j+2n, ... so that every
    data-parallel shard contributes to every microbatch (no resharding)."""

    if n == 1:
        return jax.tree.map(lambda x: x[None], batch)

    def split(x):
        b = x.shape[0]
        y = x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
        return constrain(y, (None, "batch") + (None,) * (x.ndim - 1))

    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: Callable, params: nnx.State, batch: dict, n: int) -> tuple[nnx.State, dict]:
    """Gradients and summed statistics of `loss_fn` over `n` microbatches of `batch`.

    loss_fn(params, microbatch) -> (objective scalar, stats: a dict of arrays that add up over
    microbatches). Each microbatch's objective must already be divided by whole-batch counts (and
    its constant terms by n), so that the sum over microbatches is the full-batch objective.
    Returns (grads like params, stats summed over the microbatches plus "objective").

    n = 1: one value_and_grad on the whole batch, grads in the params' dtype; no accumulator, so
    the step holds a single grads-sized buffer (measured with memory_analysis() in
    tests/test_precision.py). n > 1: a scan over the microbatches summing into a float32 carry,
    returned as it is (float32 grads: no second, rounded copy; the optimizer computes in float32).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if n == 1:
        (objective, stats), grads = grad_fn(params, batch)
        return grads, dict(stats, objective=objective)

    def step(carry, mb):
        acc, totals = carry
        (objective, stats), g = grad_fn(params, mb)
        acc = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, g)
        return (acc, jax.tree.map(jnp.add, totals, dict(stats, objective=objective))), None

    obj0, stats0 = jax.eval_shape(loss_fn, params, jax.tree.map(lambda x: x[:x.shape[0] // n], batch))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dict(stats0, objective=obj0))
    acc0 = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    (acc, totals), _ = jax.lax.scan(step, (acc0, zeros), microbatches(batch, n))
    return acc, totals


def balance_term(aux: dict, coef: float, n_micro: int) -> tuple[jax.Array, dict]:
    """The MoE balance-loss term of one of `n_micro` microbatch objectives, and its stats.

    aux: the model's aux ("balance_loss" [L_moe], unweighted, V3 eq. 17; "moe_load" [L_moe, E];
    "moe_rounds" [L_moe], the all-to-all dispatch rounds). Returns (coef * mean over layers of the
    balance loss / n_micro, {"balance": that mean, "load": the loads, "extra_rounds": dispatch
    rounds beyond the first, summed over layers}); summed over the microbatches, the term is coef
    times their mean balance.
    """
    balance = jnp.mean(aux["balance_loss"])
    stats = {"balance": balance, "load": aux["moe_load"]}
    if "moe_rounds" in aux:
        stats["extra_rounds"] = jnp.sum(jnp.maximum(aux["moe_rounds"] - 1, 0)).astype(jnp.float32)
    return coef * balance / n_micro, stats


def update_router_bias(bias: nnx.State, loads: dict[str, jax.Array], gamma: float) -> nnx.State:
    """b += gamma * sign(mean load - load), per layer. loads: 'moe' [L, E], optionally 'mtp' [D, E]
    (biases of MTP modules that did not run this step stay where they are)."""

    def step(path, var):
        load = loads.get("mtp" if path[0] == "mtp" else "moe")
        if load is None:
            return var
        delta = gamma * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
        return var.replace(var.get_value() + delta.astype(var.get_value().dtype))

    return nnx.map_state(step, bias) if gamma else bias


def load_max_over_mean(load: jax.Array) -> jax.Array:
    """Expert-load imbalance of a step: max over experts / mean over experts, averaged over layers
    (1.0 is perfectly balanced). load [L, E]."""
    return jnp.mean(jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1e-9))


ROUNDING_STREAM = 0x5352  # folded into jax.random.key(train.seed): the stochastic-rounding stream


def stochastic_round_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
    """float32 x -> bfloat16, rounded stochastically: each element becomes one of its two bfloat16
    neighbours (or itself if representable), the one further from zero with probability
    (|x| - |lower|) / (|upper| - |lower|), so that E[result] = x exactly.

    bfloat16 is the top 16 bits of float32: uniform random bits r in [0, 2^16) are added to the low
    16 bits of x's bit pattern (a carry moves x to the next bfloat16 magnitude) and the sum is
    truncated (stochastic rounding: Gupta et al. 2015, "Deep Learning with Limited Numerical
    Precision"). Infinities and NaNs convert as they are; a finite x above the largest bfloat16
    may round to inf.
    """
    x = x.astype(jnp.float32)
    noise = jax.random.bits(key, x.shape, jnp.uint16).astype(jnp.uint32)
    bits = (jax.lax.bitcast_convert_type(x, jnp.uint32) + noise) >> 16
    rounded = jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16)
    return jnp.where(jnp.isfinite(x), rounded, x.astype(jnp.bfloat16))


def rounding_key(seed: int, step: jax.Array) -> jax.Array:
    """The stochastic-rounding key of optimizer step `step` (int32 scalar): a function of (seed,
    step) only, so a resumed run draws the same bits as an uninterrupted one."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ROUNDING_STREAM), step)


def apply_updates(params: nnx.State, updates: nnx.State, key: jax.Array | None = None) -> nnx.State:
    """params + updates, formed in float32 and rounded to each param's dtype: to nearest, or with
    `key` stochastically (stochastic_round_bf16, bfloat16 leaves; leaf i draws from
    fold_in(key, i), i its index in jax.tree.leaves order). Float32 params: exactly p + u
    (optax.apply_updates)."""
    leaves, treedef = jax.tree.flatten(params)
    new = []
    for i, (p, u) in enumerate(zip(leaves, treedef.flatten_up_to(updates))):
        x = p.astype(jnp.float32) + u.astype(jnp.float32)
        if key is not None and p.dtype == jnp.bfloat16:
            new.append(stochastic_round_bf16(x, jax.random.fold_in(key, i)))
        else:
            new.append(x.astype(p.dtype))
    return jax.tree.unflatten(treedef, new)


def apply_gradients(state: TrainState, grads: nnx.State, totals: dict | None = None, *,
                    ctx: StepContext) -> tuple[TrainState, dict]:
    """The optimizer step on `grads`, then (MoE) the aux-loss-free bias update by the step's loads.

    grads: like the params, in their dtype or float32. The optimizer sees float32 params (its
    weight-decay term) and returns float32 updates; apply_updates rounds p + u to the param dtype,
    stochastically under ctx.stochastic_rounding (key: rounding_key(ctx.seed, state.step)).
    totals: accumulate_gradients' summed stats; for a MoE model they hold (balance_term) the expert
    loads "load" [L, E] (and "mtp_load" [D, E] when the MTP modules ran) and "balance", summed over
    ctx.grad_accum microbatches. Returns the new state and {"grad_norm", "lr"} (+ "balance_loss",
    the microbatches' mean, "load_max_over_mean" and "moe_extra_rounds" for a MoE model)."""
    params32 = jax.tree.map(lambda p: p.astype(jnp.float32), state.params)
    updates, opt_state = ctx.tx.update(grads, state.opt_state, params32)
    key = rounding_key(ctx.seed, state.step) if ctx.stochastic_rounding else None
    params = apply_updates(state.params, updates, key)
    metrics = {"grad_norm": global_norm(grads), "lr": ctx.schedule(state.step)}
    bias = state.router_bias
    if totals is not None and "load" in totals:
        loads = {"moe": totals["load"], **({"mtp": totals["mtp_load"]} if "mtp_load" in totals else {})}
        bias = update_router_bias(bias, loads, ctx.bias_update_speed)
        metrics["balance_loss"] = totals["balance"] / ctx.grad_accum
        metrics["load_max_over_mean"] = load_max_over_mean(loads["moe"])
        if "extra_rounds" in totals:  # all-to-all rounds beyond the first, over layers and microbatches
            metrics["moe_extra_rounds"] = totals["extra_rounds"]
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, router_bias=bias), metrics
