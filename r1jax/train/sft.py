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
import optax
from flax import nnx

from r1jax.sharding import constrain
from r1jax.train.losses import mtp_targets, token_cross_entropy
from r1jax.train.state import StepContext, TrainState

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def _objective(params, bias, batch, norm, *, ctx: StepContext):
    """Differentiable objective of one microbatch; `norm` holds the whole batch's token counts so
    that microbatch gradients add up to the full-batch gradient."""
    cfg = ctx.cfg
    model = nnx.merge(ctx.graphdef, params, bias)
    use_mtp = bool(cfg.train.mtp and cfg.model.mtp_depth)
    logits, aux = model(batch["tokens"], batch["positions"], batch["segment_ids"], with_mtp=use_mtp)
    ce_sum, n = token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    objective = ce_sum / norm["tokens"]
    stats = {"ce_sum": ce_sum, "tokens": n}
    if use_mtp:
        t, m = mtp_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"], cfg.model.mtp_depth)
        sums = jax.vmap(token_cross_entropy)(aux["mtp_logits"], t, m)[0]  # [D]
        objective += cfg.model.mtp_loss_weight / cfg.model.mtp_depth * jnp.sum(sums / norm["mtp_tokens"])
        stats["mtp_sum"] = sums
    if cfg.model.is_moe:
        balance = jnp.mean(aux["balance_loss"])
        objective += cfg.train.balance_loss_coef * balance / norm["micro"]
        stats["balance"] = balance
        stats["load"] = aux["moe_load"]
        if use_mtp:
            stats["mtp_load"] = aux["mtp_load"]
    return objective, stats


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


def sft_step(state: TrainState, batch: dict, rng: jax.Array, *, ctx: StepContext) -> tuple[TrainState, dict]:
    """One optimizer step of SFT on `batch` (see the module docstring). `rng` is unused by the
    deterministic model today and kept for a uniform update-function signature."""
    del rng
    cfg = ctx.cfg
    batch = {k: constrain(batch[k], ("batch", "length")) for k in BATCH_KEYS}
    a = cfg.train.grad_accum
    norm = {"tokens": jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0), "micro": float(a)}
    if cfg.train.mtp and cfg.model.mtp_depth:
        _, m = mtp_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"], cfg.model.mtp_depth)
        norm["mtp_tokens"] = jnp.maximum(jnp.sum(m.astype(jnp.float32), axis=(1, 2)), 1.0)  # [D]
    grad_fn = jax.value_and_grad(lambda p, mb: _objective(p, state.router_bias, mb, norm, ctx=ctx), has_aux=True)

    def accumulate(carry, mb):
        grads, totals = carry
        (obj, stats), g = grad_fn(state.params, mb)
        stats = dict(stats, objective=obj)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, totals, stats)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    first = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[:x.shape[0] // a], batch)))
    stat_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dict(first[0][1], objective=first[0][0]))
    (grads, totals), _ = jax.lax.scan(accumulate, (zeros, stat_zeros), microbatches(batch, a))

    metrics = {"loss": totals["ce_sum"] / norm["tokens"], "objective": totals["objective"]}
    new_state, more = apply_gradients(state, grads, totals, batch, a, ctx=ctx)
    metrics.update(more)
    if "mtp_sum" in totals:
        metrics["mtp_loss"] = jnp.mean(totals["mtp_sum"] / norm["mtp_tokens"])
    return new_state, metrics


def apply_gradients(state: TrainState, grads, totals: dict, batch: dict, n_micro: int, *,
                    ctx: StepContext) -> tuple[TrainState, dict]:
    """The optimizer step on summed `grads`, then (MoE) the aux-loss-free bias update from the step's
    expert loads in `totals` ("load", optionally "mtp_load"; "balance" summed over `n_micro`
    microbatches). Returns the new state and the step's shared metrics (grad_norm, lr, tokens, load)."""
    updates, opt_state = ctx.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "grad_norm": optax.tree.norm(grads),
        "lr": ctx.schedule(state.step),
        "tokens": totals["tokens"],
        "seq_tokens": jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32)),
    }
    bias = state.router_bias
    if ctx.cfg.model.is_moe:
        loads = {"moe": totals["load"]}
        if "mtp_load" in totals:
            loads["mtp"] = totals["mtp_load"]
        bias = update_router_bias(bias, loads, ctx.cfg.train.bias_update_speed)
        load = totals["load"]
        metrics["balance_loss"] = totals["balance"] / n_micro
        metrics["load_max_over_mean"] = jnp.mean(jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1e-9))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, router_bias=bias), metrics


# --------------------------------------------------------------------------------------------------
# Stage driver: `r1jax sft CONFIG`
# --------------------------------------------------------------------------------------------------


def answer_checker(cfg):
    """check(record, completion) -> bool for the held-out evaluation of data source `cfg.source`."""
    from r1jax.data import procedural
    from r1jax.evaluate import exact_match, extract_answer

    if cfg.source == "arithmetic":
        return lambda rec, text: procedural.check_arithmetic(rec["answer"], extract_answer(text) or "")
    if cfg.source == "countdown":
        return lambda rec, text: procedural.check_countdown(rec["numbers"], rec["target"], extract_answer(text) or "")
    return lambda rec, text: exact_match(rec["answer"], text)


def run_sft(cfg, step_builder=None) -> dict:
    """Run (or resume) an SFT stage. Returns {"step", "stop", "last", "evals", "history", "how"}.

    step_builder(ctx, mesh, tokenizer, state_shardings, batch_sharding) -> step_fn(state, batch, rng)
    replaces the SFT update (logit distillation trains through the same loop)."""
    import functools

    from r1jax.data.pipeline import GlobalBatchLoader, heldout, make_source
    from r1jax.evaluate import heldout_eval_fn
    from r1jax.sharding import batch_sharding
    from r1jax.summary import train_flops_per_token
    from r1jax.train.loop import run_loop
    from r1jax.train.stage import start_stage
    from r1jax.train.state import train_state_shardings

    source = make_source(cfg.data, cfg.data.split)
    start = start_stage(cfg, source)
    ctx, mesh, tok = start.ctx, start.mesh, start.tokenizer
    loader = GlobalBatchLoader(source, tok, cfg.data, cfg.train.batch_size, cfg.train.seq_len, batch_sharding(mesh))
    if start.data_state is not None:
        loader.restore(start.data_state)
    shardings = train_state_shardings(ctx, mesh)
    if step_builder is None:
        step_fn = jax.jit(functools.partial(sft_step, ctx=ctx), donate_argnums=0,
                          in_shardings=(shardings, batch_sharding(mesh), None), out_shardings=(shardings, None))
    else:
        step_fn = step_builder(ctx, mesh, tok, shardings, batch_sharding(mesh))
    records = heldout(cfg.data, cfg.train.eval_examples) if cfg.train.eval_examples else []
    eval_fn = heldout_eval_fn(ctx.graphdef, mesh, tok, cfg.data.template, records, cfg.train.eval_max_new_tokens,
                              answer_checker(cfg.data))

    flops = train_flops_per_token(cfg.model, cfg.train.seq_len, with_mtp=cfg.train.mtp)
    with jax.set_mesh(mesh):
        state, result = run_loop(cfg, step_fn, start.state, loader, data_state=loader.state,
                                 checkpointer=start.checkpointer, tokenizer_files=tok.files(), flops_per_token=flops,
                                 eval_fn=eval_fn, eval_every=cfg.train.eval_every)
    loader.close()
    if start.checkpointer is not None:
        start.checkpointer.close()
    return {"step": result.step, "stop": result.stop, "last": result.last, "evals": result.evals,
            "history": result.history, "how": start.how, "state": state, "tokenizer": tok, "ctx": ctx}
