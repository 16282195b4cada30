"""GRPO (DeepSeekMath section 4.1, DeepSeek-R1 section 2.2): the pure update `grpo_step` and the stage.

One iteration (`GRPOIteration`, the stage loop's step; train.steps counts iterations):
  1. prompts_per_step prompts, each repeated group_size times (`PromptStream`, stateless per step);
  2. rollout: `sampling.generate` on the training params themselves (same arrays, same mesh, no
     copy and no weight sync), temperature / top-p / top-k from the grpo section;
  3. rewards on the host (`r1jax.rewards.RewardFn`, worker processes with timeouts), plus DAPO's
     soft overlong penalty when set;
  4. group advantages (r - mean) / std, Dr. GRPO without the std, or leave-one-out; with
     dynamic_sampling, groups whose rewards are all equal are masked out of the loss;
  5. log pi_old (and log pi_ref when beta > 0) of the sampled tokens by the training forward;
  6. inner_epochs passes over `minibatches` shuffled minibatches, one `grpo_step` each;
  7. every ref_refresh_every iterations the reference becomes a copy of the policy (R1-Zero: 400).
`GRPOState` (checkpointed) is the TrainState's fields plus the iteration count and the reference.

A GRPO batch for `grpo_step` is a dict of arrays over B sampled sequences (prompt + response in
one row, right-padded):
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

import dataclasses
import functools
import sys
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from r1jax.config import Config, ConfigError
from r1jax.errors import DataError
from r1jax.sampling import generate, pad_prompts
from r1jax.sharding import constrain
from r1jax.tokenizer import Tokenizer, encode_prompt
from r1jax.train.losses import group_advantages, overlong_penalty, policy_objective, sampled_logprobs
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


# --------------------------------------------------------------------------------------------------
# The stage: state, prompts, one iteration (rollout -> rewards -> advantages -> mu updates), driver
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


class PromptStream:
    """Iterator of GRPO prompt batches from iteration `start` on: each yields {"records": [P],
    "tokens" [P*G, T], "lengths" [P*G]} (each prompt repeated G times, groups contiguous; right-padded
    to T = train.seq_len so every iteration has the same shapes)."""

    def __init__(self, source, tok: Tokenizer, cfg: Config, start: int):
        self.source, self.tok, self.cfg, self.it = source, tok, cfg, start
        g = cfg.grpo
        self.prompt_budget = cfg.train.seq_len - g.max_new_tokens
        if self.prompt_budget <= 0:
            raise ConfigError(f"train.seq_len: {cfg.train.seq_len} leaves no room for prompts after "
                              f"grpo.max_new_tokens={g.max_new_tokens}")

    def state(self) -> dict:
        return {"iteration": self.it}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        g = self.cfg.grpo
        idx = prompt_indices(len(self.source), self.cfg.data.seed, self.it, g.prompts_per_step)
        records = [self.source[int(i)] for i in idx]
        prompts = []
        for rec in records:
            ids = encode_prompt(self.tok, self.cfg.data.template, rec["question"])
            if len(ids) > self.prompt_budget:
                raise DataError(f"{rec.get('id', 'a record')}: its prompt has {len(ids)} tokens, more than "
                                f"train.seq_len - grpo.max_new_tokens = {self.prompt_budget}")
            prompts += [ids] * g.group_size
        tokens, lengths = pad_prompts(prompts, self.cfg.train.seq_len, self.tok.pad_id)
        self.it += 1
        return {"records": records, "tokens": tokens, "lengths": lengths}


def _global(x: np.ndarray, sharding) -> jax.Array:
    """A host array that every process holds in full -> a global array with `sharding`."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _prepare(params, bias, ref_params, rows, plens, sampler_logp, num_new, *, ctx: StepContext):
    """pi_old (and pi_ref) log-probs of the rollout by the training forward, and how far the
    sampler's own log-probs are from pi_old (a check that sampling and training agree)."""
    old = token_logprobs(params, bias, rows, ctx=ctx)
    out = {"old_logp": old}
    if ref_params is not None:
        out["ref_logp"] = token_logprobs(ref_params, bias, rows, ctx=ctx)
    n = sampler_logp.shape[1]
    pos = jnp.clip(plens[:, None] - 1 + jnp.arange(n)[None], 0, old.shape[1] - 1)  # target of position p is p + 1
    valid = jnp.arange(n)[None] < num_new[:, None]
    diff = jnp.abs(jnp.take_along_axis(old, pos, axis=1) - sampler_logp) * valid
    out["logp_mismatch"] = jnp.sum(diff) / jnp.maximum(jnp.sum(valid), 1)
    return out


def _minibatch_step(state: TrainState, batch: dict, idx: jax.Array, *, ctx: StepContext):
    return grpo_step(state, {k: v[idx] for k, v in batch.items()}, None, ctx=ctx)


class GRPOIteration:
    """One GRPO iteration as the loop's step function: (GRPOState, prompt batch, rng) -> (GRPOState,
    metrics). Rollout, log-prob passes and updates are compiled; rewards run on the host."""

    def __init__(self, ctx: StepContext, mesh, tok: Tokenizer, reward_fn):
        from r1jax.sharding import batch_sharding
        from r1jax.train.state import train_state_shardings

        self.ctx, self.cfg, self.g, self.mesh, self.tok, self.reward_fn = ctx, ctx.cfg, ctx.cfg.grpo, mesh, tok, reward_fn
        self.rows_sharding = batch_sharding(mesh)
        self.vec_sharding = batch_sharding(mesh, 1)
        shardings = train_state_shardings(ctx, mesh)
        self.prepare = jax.jit(functools.partial(_prepare, ctx=ctx))
        self.update = jax.jit(functools.partial(_minibatch_step, ctx=ctx), donate_argnums=0,
                              out_shardings=(shardings, None))
        self.make_rows = jax.jit(rollout_batch)
        self.updates_per_iteration = self.g.inner_epochs * self.g.minibatches

    def __call__(self, state: GRPOState, batch: dict, rng: jax.Array) -> tuple[GRPOState, dict]:
        g, cfg = self.g, self.cfg
        it = int(jax.device_get(state.step))
        rng = jax.random.fold_in(rng, it)
        sample_key, perm_seed = jax.random.split(rng)
        tokens = _global(batch["tokens"], self.rows_sharding)
        plens = _global(batch["lengths"], self.vec_sharding)

        t0 = time.perf_counter()
        model_state = nnx.merge_state(state.params, state.router_bias)  # the training params, no copy
        out = generate(self.ctx.graphdef, model_state, tokens, plens, sample_key, max_new_tokens=g.max_new_tokens,
                       eos_id=self.tok.eos_id, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                       vocab_limit=self.tok.vocab_size)
        toks, tlens = _host(out["tokens"]), _host(out["lengths"])
        t_sample = time.perf_counter() - t0

        host_plens = np.asarray(batch["lengths"])
        num_new = tlens - host_plens
        records = [r for r in batch["records"] for _ in range(g.group_size)]
        texts = [self.tok.decode(toks[i, host_plens[i]:tlens[i]].tolist(), skip_special=True) for i in range(len(toks))]
        t1 = time.perf_counter()
        scores = self.reward_fn(texts, records)
        t_reward = time.perf_counter() - t1
        total = np.asarray(scores["total"], np.float32)
        if g.overlong_max_len:
            total = total + np.asarray(overlong_penalty(jnp.asarray(num_new), g.overlong_max_len, g.overlong_cache))
        adv = np.asarray(group_advantages(jnp.asarray(total), g.group_size, std_normalize=g.std_normalize,
                                          leave_one_out=g.leave_one_out))
        groups = total.reshape(-1, g.group_size)
        keep = np.ones(len(groups), bool)
        if g.dynamic_sampling:  # DAPO: a group whose rewards are all equal carries no signal
            keep = groups.max(1) > groups.min(1)
        row_keep = np.repeat(keep, g.group_size).astype(np.float32)

        rows = self.make_rows(out["tokens"], plens, out["lengths"])
        rows["response_mask"] = rows["response_mask"] * _global(row_keep, self.vec_sharding)[:, None]
        rows["advantages"] = _global(adv, self.vec_sharding)
        extra = self.prepare(state.params, state.router_bias, state.ref_params, rows, plens, out["logprobs"],
                             out["num_new"])
        mismatch = extra.pop("logp_mismatch")
        rows.update(extra)

        t2 = time.perf_counter()
        # A minibatch with nothing to learn (every kept row has zero advantage and there is no KL
        # term, or no row is kept) is skipped rather than stepped: Adam would scale the balance
        # loss's tiny gradient alone up to a full-size update, a random walk away from the policy.
        useful = (row_keep > 0) & ((adv != 0) | (g.beta > 0))
        ts, step_metrics, skipped = state.train_state(), [], 0
        n_rows, mb = len(toks), len(toks) // g.minibatches
        rng_np = np.random.default_rng([cfg.train.seed, it])
        for _ in range(g.inner_epochs):
            perm = rng_np.permutation(n_rows)
            for k in range(g.minibatches):
                sel = perm[k * mb:(k + 1) * mb]
                if not useful[sel].any():
                    skipped += 1
                    continue
                ts, m = self.update(ts, rows, _global(sel.astype(np.int32), self.vec_sharding))
                step_metrics.append(m)
        step_metrics = jax.device_get(step_metrics)
        t_train = time.perf_counter() - t2

        ref = state.ref_params
        if ref is not None and (it + 1) % g.ref_refresh_every == 0:
            ref = jax.tree.map(jnp.copy, ts.params)
        new = GRPOState(step=state.step + 1, opt_step=ts.step, params=ts.params, opt_state=ts.opt_state,
                        router_bias=ts.router_bias, ref_params=ref)

        metrics = {k: float(np.mean([m[k] for m in step_metrics])) for k in (step_metrics[0] if step_metrics else {})}
        metrics.setdefault("loss", 0.0)
        metrics["updates"] = float(len(step_metrics))
        metrics["skipped_updates"] = float(skipped)
        metrics["reward"] = float(total.mean())
        for name, values in scores.items():
            if name != "total":
                metrics[f"reward_{name}"] = float(np.mean(values))
        if "accuracy" in scores:
            metrics["accuracy"] = float(np.mean(np.asarray(scores["accuracy"]) > 0.5))
        metrics["reward_std_in_group"] = float(groups.std(1).mean())
        metrics["groups_kept"] = float(keep.mean())
        metrics["response_length"] = float(num_new.mean())
        metrics["response_length_max"] = float(num_new.max())
        ended = np.asarray([toks[i, tlens[i] - 1] == self.tok.eos_id if num_new[i] else False for i in range(len(toks))])
        metrics["truncated"] = float(1.0 - ended.mean())
        metrics["logp_mismatch"] = float(mismatch)
        metrics["sampling_tokens_per_s"] = float(num_new.sum() / max(t_sample, 1e-9))
        trained = float(np.sum(tlens)) * g.inner_epochs if step_metrics else 0.0
        metrics["training_tokens_per_s"] = trained / max(t_train, 1e-9)
        metrics["tokens_per_s"] = (float(num_new.sum()) + trained) / max(time.perf_counter() - t0, 1e-9)
        metrics["reward_seconds"] = t_reward
        return new, metrics


def make_reward_fn(cfg: Config):
    from r1jax.rewards import RewardFn

    return RewardFn(dataclasses.asdict(cfg.grpo.rewards), timeout=cfg.grpo.reward_timeout,
                    workers=cfg.grpo.reward_workers, template=cfg.data.template)


def eval_checker():
    """check(record, completion) for held-out evaluation: the accuracy reward's verdict."""
    from r1jax.rewards import accuracy_reward

    return lambda rec, text: accuracy_reward(text, rec) > 0.5


def run_grpo(cfg: Config, reward_fn=None) -> dict:
    """Run (or resume) a GRPO stage. Returns {"step", "stop", "last", "evals", "history", "how", ...}.

    `reward_fn(completions, records) -> {"total": [N], <component>: [N]}` defaults to the rule-based
    rewards weighted by grpo.rewards (r1jax.rewards.RewardFn).
    """
    from r1jax.data.pipeline import heldout, make_source
    from r1jax.evaluate import heldout_eval_fn
    from r1jax.train.loop import append_eval, run_loop
    from r1jax.train.stage import start_stage
    from r1jax.train.state import make_context

    g = cfg.grpo
    source = make_source(cfg.data, cfg.data.split)
    ctx = make_context(cfg, schedule_steps=cfg.train.steps * g.inner_epochs * g.minibatches)
    start = start_stage(cfg, source, ctx=ctx, wrap=grpo_wrap(g.beta))
    mesh, tok = start.mesh, start.tokenizer
    own_rewards = reward_fn is None
    reward_fn = reward_fn or make_reward_fn(cfg)
    step0 = int(jax.device_get(start.state.step))
    prompts = PromptStream(source, tok, cfg, start=step0)
    records = heldout(cfg.data, cfg.train.eval_examples) if cfg.train.eval_examples else []
    eval_fn = heldout_eval_fn(ctx.graphdef, mesh, tok, cfg.data.template, records, cfg.train.eval_max_new_tokens,
                              eval_checker()) if records else None

    evals = []
    if start.how != "resume" and records:
        evals.append(dict(eval_fn(start.state), step=step0))
        append_eval(cfg.checkpoint.dir, evals[0])
        if jax.process_index() == 0:
            print(f"eval at step {step0} (before GRPO): accuracy {evals[0]['accuracy']:.4f}", file=sys.stderr,
                  flush=True)
    iteration = GRPOIteration(ctx, mesh, tok, reward_fn)
    try:
        with jax.set_mesh(mesh):
            state, result = run_loop(cfg, iteration, start.state, prompts, data_state=prompts.state,
                                     checkpointer=start.checkpointer, tokenizer_files=tok.files(), flops_per_token=0.0,
                                     eval_fn=eval_fn, eval_every=cfg.train.eval_every)
    finally:
        if own_rewards and hasattr(reward_fn, "close"):
            reward_fn.close()
        if start.checkpointer is not None:
            start.checkpointer.close()
    return {"step": result.step, "stop": result.stop, "last": result.last, "evals": evals + result.evals,
            "history": result.history, "how": start.how, "state": state, "tokenizer": tok, "ctx": ctx}
