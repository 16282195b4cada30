"""The GRPO stage driver: `r1jax grpo CONFIG` (R1-Zero; R1's reasoning RL and RL for all scenarios).

One iteration (`GRPOIteration`, the stage loop's step; train.steps counts iterations), in six parts:
  1. rollout     group_size samples of each of prompts_per_step prompts, in-graph (`sampling.generate`
                 on the training params, resharded once into the decode layout and dropped after:
                 `sampling.decode_layout`; same mesh, no weight sync), drawn as `sampling` says;
  2. score       rewards on the host (`r1jax.rewards.RewardFn`: worker processes with timeouts and
                 a memory cap), plus DAPO's soft overlong penalty when set; the scoring counts
                 (timeouts, refusals, worker restarts, ...) go to the metrics;
  3. advantages  group advantages (r - mean) / std, Dr. GRPO without the std, or leave-one-out; with
                 dynamic_sampling, groups whose rewards are all equal are masked out of the loss;
  4. log-probs   log pi_old (and log pi_ref when beta > 0) of the sampled tokens by the training forward,
                 in microbatches, on the rollouts packed several to a row by their actual lengths;
  5. updates     inner_epochs passes over `minibatches` shuffled minibatches, one `grpo_step` each;
                 every ref_refresh_every iterations the reference becomes a copy of the policy;
  6. metrics     reward by component, accuracy, lengths, KL, clip fraction, mismatch, throughput.
Prompts come from `PromptStream`, stateless per iteration, so a resumed run draws the same ones.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.config import Config, ConfigError
from r1jax.data.pipeline import heldout, make_source
from r1jax.errors import DataError
from r1jax.evaluate import eval_scorer, heldout_eval_fn
from r1jax.rewards import RewardFn
from r1jax.rewards.combine import STAT_MAXIMA, stats_delta
from r1jax.sampling import decode_layout_state, generate, pad_prompts
from r1jax.sharding import BATCH_AXES, batch_sharding
from r1jax.stages.loop import run_loop
from r1jax.stages.result import StageResult
from r1jax.stages.start import start_stage
from r1jax.tokenizer import Tokenizer, encode_prompt
from r1jax.train.grpo import (
    GRPOLoss,
    GRPOState,
    advantages_and_masks,
    grpo_step,
    grpo_wrap,
    minibatch_plan,
    pack_plan,
    packed_rows,
    prompt_indices,
    rollout_batch,
    token_logprobs,
    unpack_rows,
)
from r1jax.train.losses import importance_weights, overlong_penalty
from r1jax.train.state import (
    StepContext,
    TrainState,
    make_context,
    train_state_shardings,
)


class PromptStream:
    """Iterator of GRPO prompt batches from iteration `start` on: each yields {"records": [P],
    "tokens" [P, T], "lengths" [P]}, each prompt once, right-padded to T = train.seq_len so every
    iteration has the same shapes (the rollout samples each group_size times)."""

    def __init__(self, source, tok: Tokenizer, cfg: Config, start: int):
        self.source, self.tok, self.cfg, self.it = source, tok, cfg, start
        self.prompt_budget = cfg.train.seq_len - cfg.sampling.max_new_tokens
        if self.prompt_budget <= 0:
            raise ConfigError(f"train.seq_len: {cfg.train.seq_len} leaves no room for prompts after "
                              f"sampling.max_new_tokens={cfg.sampling.max_new_tokens}")

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
                                f"train.seq_len - sampling.max_new_tokens = {self.prompt_budget}")
            prompts.append(ids)
        tokens, lengths = pad_prompts(prompts, self.cfg.train.seq_len, self.tok.pad_id)
        self.it += 1
        return {"records": records, "tokens": tokens, "lengths": lengths}


def _global(x: np.ndarray, sharding) -> jax.Array:
    """A host array that every process holds in full -> a global array with `sharding`."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def own_rows(n: int) -> slice:
    """The rollout rows this process decodes and scores: its contiguous 1/process_count share of
    the n rows (all of them on one process, or when n does not split evenly)."""
    count, index = jax.process_count(), jax.process_index()
    if count == 1 or n % count:
        return slice(0, n)
    return slice(index * n // count, (index + 1) * n // count)


def gather_rows(x: np.ndarray, rows: slice, n: int) -> np.ndarray:
    """A per-row host array of this process's `rows` -> all n rows in order, from every process
    (a process_allgather of the shares; no collective when `rows` already covers them)."""
    x = np.asarray(x)
    if jax.process_count() == 1 or rows == slice(0, n):
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _sum_over_processes(counts: dict) -> dict:
    """Scoring counts of every process: added up, maxima (rewards.STAT_MAXIMA) their max."""
    from jax.experimental import multihost_utils

    keys = sorted(counts)
    every = np.asarray(multihost_utils.process_allgather(np.asarray([counts[k] for k in keys], np.float64)))
    return {k: float(every[:, i].max() if k in STAT_MAXIMA else every[:, i].sum()) for i, k in enumerate(keys)}


def _host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass
class Rollout:
    """Part 1's output: the iteration's N = prompts x group_size sampled sequences."""

    out: dict  # generate's global arrays: tokens [N, T], lengths [N], logprobs [N, max_new], num_new [N]
    #            (+ routes [N, T, L_moe, k] with grpo.routing_replay)
    prompt_lengths: jax.Array  # [N], global
    tokens: np.ndarray  # [N, T] host copy of out["tokens"]
    lengths: np.ndarray  # [N] prompt + response
    num_new: np.ndarray  # [N] response tokens
    texts: list[str]  # the decoded responses of this process's rows (`own`)
    records: list[dict]  # their prompt records (groups contiguous)
    seconds: float
    own: slice | None = None  # the rows this process scores (own_rows); None: all of them
    general: np.ndarray | None = None  # [N] bool: the row's prompt is a general one (scenario "general")


@dataclasses.dataclass
class Scores:
    """Part 2's output: reward components [N] (as the reward function names them) and the total."""

    components: dict[str, np.ndarray]
    total: np.ndarray  # [N] float32, overlong penalty included
    seconds: float
    counts: dict | None = None  # a RewardFn's `stats` over this call (rewards.stats_delta), else None


@dataclasses.dataclass
class Updates:
    """Part 5's output: the policy after the iteration's optimizer steps, and their metrics."""

    state: TrainState
    step_metrics: list[dict]
    skipped: int
    seconds: float


def _prepare(params, bias, ref_params, rows, plens, sampler_logp, num_new, plan=None, *, ctx: StepContext,
             micro: int):
    """pi_old (and pi_ref) log-probs [N, T] of the rollout by the training forward, how far the
    sampler's own log-probs are from pi_old (a check that sampling and training agree), and with
    grpo.mismatch the per-token correction weights `is_weight` [N, T] (losses.importance_weights)
    and their stats.

    The passes run in `micro` microbatches (`token_logprobs`); with a `plan` (`pack_plan`'s arrays)
    on the rollouts packed several to a row, their log-probs then mapped back to the rollout rows.
    With routing replay (rows["routes"]) pi_old's forward selects the sampler's experts; pi_ref's
    routes itself (the reference is another policy: its own distribution is the KL's target)."""
    if plan is None:
        pass_rows, to_rows = rows, lambda x: x  # noqa: E731
    else:
        pass_rows, to_rows = packed_rows(rows, plan), lambda x: unpack_rows(x, plan)  # noqa: E731
    old, counts = token_logprobs(params, bias, pass_rows, ctx=ctx, micro=micro, return_aux=True)
    old = to_rows(old)
    out = {"old_logp": old}
    if counts:  # routing replay: how often the training router disagrees with the sampler's selection
        out["routing_mismatch"] = counts["route_flips"] / jnp.maximum(counts["route_replayed"], 1.0)
    if ref_params is not None:
        ref_rows = {k: v for k, v in pass_rows.items() if k != "routes"}
        out["ref_logp"] = to_rows(token_logprobs(ref_params, bias, ref_rows, ctx=ctx, micro=micro))
    sampled, valid = sampler_logp_rows(sampler_logp, plens, num_new, old.shape[1])
    out["logp_mismatch"] = jnp.sum(jnp.abs(old - sampled) * valid) / jnp.maximum(jnp.sum(valid), 1)
    if ctx.loss.mismatch != "off":
        out["is_weight"], stats = importance_weights(old, sampled, rows["response_mask"], ctx.loss.mismatch,
                                                     ctx.loss.mismatch_cap)
        out.update(stats)
    return out


def sampler_logp_rows(sampler_logp: jax.Array, plens: jax.Array, num_new: jax.Array, width: int):
    """The sampler's log-prob of new token j of row i ([N, max_new]) placed at that token's target
    position plens[i] - 1 + j of the training rows ([N, width]: position p's target is token
    p + 1), 0 elsewhere; and the float32 mask of the positions that hold one."""
    n = sampler_logp.shape[1]
    live = jnp.arange(n)[None] < num_new[:, None]
    where = jnp.where(live, plens[:, None] - 1 + jnp.arange(n)[None], width)  # past a row's end: dropped
    rows = jnp.arange(sampler_logp.shape[0])[:, None]
    placed = jnp.zeros((sampler_logp.shape[0], width), jnp.float32).at[rows, where].set(sampler_logp, mode="drop")
    mask = jnp.zeros((sampler_logp.shape[0], width), jnp.float32).at[rows, where].set(1.0, mode="drop")
    return placed, mask


def _minibatch_step(state: TrainState, batch: dict, idx: jax.Array, *, ctx: StepContext):
    return grpo_step(state, {k: v[idx] for k, v in batch.items()}, None, ctx=ctx)


class GRPOIteration:
    """One GRPO iteration as the loop's step function: (GRPOState, prompt batch, rng) -> (GRPOState,
    metrics). Rollout, log-prob passes and updates are compiled; scoring runs on the host."""

    reward_model = None  # grpo.reward_model's RolloutRewardModel: scores the general prompts' rollouts

    def __init__(self, cfg: Config, ctx: StepContext, mesh, tok: Tokenizer, reward_fn):
        self.ctx, self.cfg, self.g, self.s, self.mesh, self.tok = ctx, cfg, cfg.grpo, cfg.sampling, mesh, tok
        self.reward_fn = reward_fn
        self.rows_sharding = batch_sharding(mesh)
        self.vec_sharding = batch_sharding(mesh, 1)
        self.batch_shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))
        shardings = train_state_shardings(ctx, mesh)
        # The log-prob passes run in microbatches of an update microbatch's rollouts (or fewer packed rows).
        self.pass_micro = cfg.grpo.minibatches * ctx.grad_accum
        self._prepare = jax.jit(functools.partial(_prepare, ctx=ctx, micro=self.pass_micro))
        self._update = jax.jit(functools.partial(_minibatch_step, ctx=ctx), donate_argnums=0,
                               out_shardings=(shardings, None))
        self._make_rows = jax.jit(rollout_batch)
        if cfg.grpo.reward_model:
            from r1jax.stages.reward_model import RolloutRewardModel

            self.reward_model = RolloutRewardModel(cfg.grpo.reward_model, cfg, mesh, tok, micro=self.pass_micro)

    def __call__(self, state: GRPOState, batch: dict, rng: jax.Array) -> tuple[GRPOState, dict]:
        it = int(jax.device_get(state.step))
        sample_key, _ = jax.random.split(jax.random.fold_in(rng, it))
        rollout = self.rollout(state, batch, sample_key)
        scores = self.score(rollout)
        rows, weights = self.advantages_and_masks(rollout, scores)
        rows, mismatch = self.logprob_passes(state, rows, rollout)
        updates = self.updates(state, rows, weights["useful"], it)
        new_state = self.next_state(state, updates.state, it)
        return new_state, self.metrics(rollout, scores, weights, updates, mismatch)

    def rollout(self, state: GRPOState, batch: dict, key: jax.Array) -> Rollout:
        """1. Sample group_size continuations of every prompt of `batch` (tokens [P, T], lengths [P])
        with the training params, in-graph; decode the responses on the host. N = P x group_size
        rows come out, each group contiguous.

        Each prompt is prefilled once for its whole group (`generate(samples_per_prompt=G)`) when the
        P prompt rows split evenly over the mesh's batch shards; otherwise the prompts are repeated
        G times first and every row prefills its own copy (same samples, G times the prefill)."""
        t0 = time.perf_counter()
        g = self.g.group_size
        prompt_tokens, prompt_lens = np.asarray(batch["tokens"]), np.asarray(batch["lengths"])
        shared = len(prompt_lens) % self.batch_shards == 0
        if not shared:
            prompt_tokens, prompt_lens = np.repeat(prompt_tokens, g, axis=0), np.repeat(prompt_lens, g)
        host_plens = np.repeat(prompt_lens, g) if shared else prompt_lens
        tokens = _global(prompt_tokens, self.rows_sharding)
        plens = _global(prompt_lens, self.vec_sharding)
        model_state = nnx.merge_state(state.params, state.router_bias)  # the training params
        s = self.s
        layout = "decode" if s.decode_layout else "train"
        if s.decode_layout:  # resharded once for decoding; the trained params are untouched
            model_state = decode_layout_state(model_state, self.mesh)
        out = generate(self.ctx.graphdef, model_state, tokens, plens, key, max_new_tokens=s.max_new_tokens,
                       eos_id=self.tok.eos_id, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                       vocab_limit=self.tok.vocab_size, samples_per_prompt=g if shared else 1, layout=layout,
                       record_routes=self.g.routing_replay == "rollout")
        del model_state  # the decode copy goes before the log-prob passes
        plens = _global(host_plens, self.vec_sharding)
        toks, tlens = _host(out["tokens"]), _host(out["lengths"])
        own = own_rows(len(toks))  # each process decodes (and scores) only its share of the rows
        texts = [self.tok.decode(toks[i, host_plens[i]:tlens[i]].tolist(), skip_special=True)
                 for i in range(own.start, own.stop)]
        every = [r for r in batch["records"] for _ in range(g)]
        general = np.asarray([r.get("scenario", "reasoning") == "general" for r in every])
        return Rollout(out=out, prompt_lengths=plens, tokens=toks, lengths=tlens, num_new=tlens - host_plens,
                       texts=texts, records=every[own], seconds=time.perf_counter() - t0, own=own, general=general)

    def score(self, rollout: Rollout) -> Scores:
        """2. Rewards of each response on the host: the reward function's components and their
        weighted total, plus DAPO's overlong penalty (grpo.overlong_max_len > 0). Each process
        scores its own rows (rollout.own); the per-row results are then gathered from all
        processes, so every process holds all N (and the scoring counts are summed)."""
        t0 = time.perf_counter()
        stats = getattr(self.reward_fn, "stats", None)  # a RewardFn's: timeouts, refusals, restarts, ...
        before = stats() if callable(stats) else None
        scores = self.reward_fn(rollout.texts, rollout.records)
        counts = stats_delta(before, stats()) if before is not None else None
        n = len(rollout.tokens)
        own = rollout.own or slice(0, n)
        scores = {k: gather_rows(np.asarray(v, np.float32), own, n) for k, v in scores.items()}
        if counts and jax.process_count() > 1 and own != slice(0, n):
            counts = _sum_over_processes(counts)
        total = np.asarray(scores["total"], np.float32)
        general, reward_model = rollout.general, self.reward_model
        if reward_model is not None and general is not None and general.any():
            # R1 section 2.3.4: general prompts are scored by the reward model, reasoning ones by the rules
            rm = reward_model.scores(rollout.out["tokens"], rollout.prompt_lengths, rollout.out["lengths"])
            scores = {k: np.where(general, 0.0, v).astype(np.float32) for k, v in scores.items()}  # rules: reasoning
            scores["reward_model"] = np.where(general, rm, 0.0).astype(np.float32)
            total = np.where(general, self.g.reward_model_weight * rm, total).astype(np.float32)
        g = self.g
        if g.overlong_max_len:
            total = total + np.asarray(overlong_penalty(jnp.asarray(rollout.num_new), g.overlong_max_len,
                                                        g.overlong_cache))
        components = {k: np.asarray(v) for k, v in scores.items() if k != "total"}
        return Scores(components=components, total=total, seconds=time.perf_counter() - t0, counts=counts)

    def advantages_and_masks(self, rollout: Rollout, scores: Scores) -> tuple[dict, dict]:
        """3. Group advantages and the rows each update trains on. Returns (training rows on the mesh:
        tokens, positions, segment_ids, targets, response_mask (masked groups zeroed), advantages,
        and with grpo.routing_replay the sampler's routes; the host weights of
        `train.grpo.advantages_and_masks`)."""
        g = self.g
        weights = advantages_and_masks(scores.total, g.group_size, std_normalize=g.std_normalize,
                                       leave_one_out=g.leave_one_out, dynamic_sampling=g.dynamic_sampling,
                                       beta=g.beta, std_over=g.std_over,
                                       strata=None if rollout.general is None else rollout.general.astype(np.int32))
        rows = self._make_rows(rollout.out["tokens"], rollout.prompt_lengths, rollout.out["lengths"])
        rows["response_mask"] = rows["response_mask"] * _global(weights["row_keep"], self.vec_sharding)[:, None]
        rows["advantages"] = _global(weights["advantages"], self.vec_sharding)
        if "routes" in rollout.out:  # routing replay: every training forward selects the sampler's experts
            rows["routes"] = rollout.out["routes"]
        return rows, weights

    def logprob_passes(self, state: GRPOState, rows: dict, rollout: Rollout) -> tuple[dict, dict]:
        """4. log pi_old (and log pi_ref) of every sampled token by the training forward, added to
        `rows` (with grpo.mismatch, also the correction weights `is_weight`); and the mismatch
        stats: logp_mismatch, the mean |log pi_old - the sampler's log-prob| over response tokens
        (+ is_ratio_mean, is_ratio_max, is_corrected_share with grpo.mismatch; + routing_mismatch
        with grpo.routing_replay: the share of the sampler's (token, MoE layer) selections that the
        training forward's own router would have made differently, which replay overrides).

        The rollouts are packed by their actual lengths when that takes fewer rows (`pack_plan`:
        a pass then costs about the tokens generated, not rollouts x row length), and each pass
        runs in `pass_micro` microbatches."""
        plan = pack_plan(rollout.lengths, rollout.tokens.shape[1], self.pass_micro * self.batch_shards)
        if plan is not None:
            plan = {k: _global(v, self.rows_sharding) for k, v in plan.items()}
        extra = self._prepare(state.params, state.router_bias, state.ref_params, rows, rollout.prompt_lengths,
                              rollout.out["logprobs"], rollout.out["num_new"], plan)
        mismatch = {k: extra.pop(k) for k in ("logp_mismatch", "is_ratio_mean", "is_ratio_max",
                                               "is_corrected_share", "routing_mismatch") if k in extra}
        return dict(rows, **extra), mismatch

    def updates(self, state: GRPOState, rows: dict, useful: np.ndarray, it: int) -> Updates:
        """5. inner_epochs x minibatches optimizer steps (`grpo_step`) on shuffled minibatches of
        `rows`. A minibatch with nothing to learn (no useful row: every kept row has zero advantage
        and there is no KL term, or no row is kept) is skipped rather than stepped: Adam would scale
        the balance loss's tiny gradient alone up to a full-size update, a random walk away from
        the policy."""
        t0 = time.perf_counter()
        ts, step_metrics, skipped = state.train_state(), [], 0
        for sel in minibatch_plan(len(useful), self.g.minibatches, self.g.inner_epochs, self.cfg.train.seed, it):
            if not useful[sel].any():
                skipped += 1
                continue
            ts, m = self._update(ts, rows, _global(sel.astype(np.int32), self.vec_sharding))
            step_metrics.append(m)
        step_metrics = jax.device_get(step_metrics)
        return Updates(state=ts, step_metrics=step_metrics, skipped=skipped, seconds=time.perf_counter() - t0)

    def next_state(self, state: GRPOState, ts: TrainState, it: int) -> GRPOState:
        """The GRPOState after iteration `it`: the updated policy; the reference refreshed to a copy
        of it every ref_refresh_every iterations."""
        ref = state.ref_params
        if ref is not None and (it + 1) % self.g.ref_refresh_every == 0:
            ref = jax.tree.map(jnp.copy, ts.params)
        return GRPOState(step=state.step + 1, opt_step=ts.step, params=ts.params, opt_state=ts.opt_state,
                         router_bias=ts.router_bias, ref_params=ref)

    def metrics(self, rollout: Rollout, scores: Scores, weights: dict, updates: Updates, mismatch) -> dict:
        """6. The iteration's metrics: the updates' means (loss, kl, clip_fraction, entropy, ...),
        rewards by component, accuracy, lengths, truncation, kept groups, sampler/trainer mismatch,
        and the tokens sampled and trained (the loop's tokens/s) with their parts' rates."""
        g, steps, num_new = self.g, updates.step_metrics, rollout.num_new
        out = {k: float(np.mean([m[k] for m in steps])) for k in (steps[0] if steps else {})}
        out.setdefault("loss", 0.0)
        out["updates"] = float(len(steps))
        out["skipped_updates"] = float(updates.skipped)
        out["reward"] = float(scores.total.mean())
        for name, values in scores.components.items():
            out[f"reward_{name}"] = float(np.mean(values))
        general = rollout.general
        reasoning = ~general if general is not None and general.any() else slice(None)
        if "accuracy" in scores.components and (general is None or not general.all()):
            out["accuracy"] = float(np.mean(scores.components["accuracy"][reasoning] > 0.5))  # reasoning rows
        if "reward_model" in scores.components:  # mean reward-model score of the general rows
            out["reward_model_general"] = float(np.mean(scores.components["reward_model"][general]))
        out["reward_std_in_group"] = float(scores.total.reshape(-1, g.group_size).std(1).mean())
        out["groups_kept"] = float(weights["keep"].mean())
        out["response_length"] = float(num_new.mean())
        out["response_length_max"] = float(num_new.max())
        ended = np.asarray([rollout.tokens[i, rollout.lengths[i] - 1] == self.tok.eos_id if num_new[i] else False
                            for i in range(len(num_new))])
        out["truncated"] = float(1.0 - ended.mean())
        for key, value in (mismatch if isinstance(mismatch, dict) else {"logp_mismatch": mismatch}).items():
            out[key] = float(value)  # logp_mismatch; with grpo.mismatch the correction's is_* stats
        out["sampled_tokens"] = float(num_new.sum())
        out["trained_tokens"] = float(np.sum(rollout.lengths)) * g.inner_epochs if steps else 0.0
        out["sampling_tokens_per_s"] = out["sampled_tokens"] / max(rollout.seconds, 1e-9)
        out["training_tokens_per_s"] = out["trained_tokens"] / max(updates.seconds, 1e-9)
        out["reward_seconds"] = scores.seconds
        for key, value in (scores.counts or {}).items():  # timeouts, refusals, restarts, ... of this iteration
            if key not in ("completions", "worker_peak_rss_mb"):  # no memory figure: the metrics replay on resume
                out[f"reward_{key}"] = float(value)
        return out


def _iteration_tokens(batch: dict, metrics: dict) -> int:
    return int(metrics["sampled_tokens"] + metrics["trained_tokens"])


def reward_limits(cfg: Config) -> dict:
    """The reward workers' limits from the grpo section (the GRPO, eval and rejection stages share
    them): timeout, workers, memory_mb (address space per worker), max_chars (longest scored completion)."""
    g = cfg.grpo
    return {"timeout": g.reward_timeout, "workers": g.reward_workers,
            "memory_mb": g.reward_memory_mb, "max_chars": g.reward_max_chars}


def heldout_scorer(cfg: Config):
    """The held-out evaluation's scorer: the rule checker in reward workers (eval_scorer, the grpo
    section's limits); with data.general_share, general prompts scored by their hidden preference."""
    scorer = eval_scorer(cfg.data.template, **reward_limits(cfg))  # workers start at the first eval, if any
    if cfg.data.general_share > 0:
        from r1jax.stages.reward_model import HiddenPreferenceScorer

        scorer = HiddenPreferenceScorer(scorer)
    return scorer


def make_reward_fn(cfg: Config) -> RewardFn:
    return RewardFn(dataclasses.asdict(cfg.grpo.rewards), template=cfg.data.template, **reward_limits(cfg))


def run_grpo(cfg: Config, reward_fn=None) -> StageResult:
    """Run (or resume) a GRPO stage.

    `reward_fn(completions, records) -> {"total": [N], <component>: [N]}` defaults to the rule-based
    rewards weighted by grpo.rewards (r1jax.rewards.RewardFn). Held-out greedy accuracy is evaluated
    before the first iteration (unless resuming), every train.eval_every iterations and at the end.
    """
    g = cfg.grpo
    rows_per_update = g.prompts_per_step * g.group_size // g.minibatches
    if rows_per_update % cfg.train.grad_accum:
        raise ConfigError(f"train.grad_accum: {cfg.train.grad_accum} does not divide a GRPO minibatch of "
                          f"{rows_per_update} rollouts (grpo.prompts_per_step * group_size / minibatches)")
    if g.routing_replay != "off" and not cfg.model.n_moe_layers:
        raise ConfigError(f"grpo.routing_replay: {g.routing_replay!r} replays MoE routing, and this model "
                          f"({cfg.model.family}) has no MoE layer; set it to off")
    source = make_source(cfg.data, cfg.data.split)
    ctx = make_context(cfg, schedule_steps=cfg.train.steps * g.inner_epochs * g.minibatches,
                       loss=GRPOLoss.from_config(cfg))
    start = start_stage(cfg, source, ctx=ctx, wrap=grpo_wrap(g.beta))
    mesh, tok = start.mesh, start.tokenizer
    own_rewards = reward_fn is None
    reward_fn = reward_fn or make_reward_fn(cfg)
    prompts = PromptStream(source, tok, cfg, start=int(jax.device_get(start.state.step)))
    records = heldout(cfg.data, cfg.train.eval_examples) if cfg.train.eval_examples else []
    scorer = heldout_scorer(cfg)
    eval_fn = heldout_eval_fn(ctx.graphdef, mesh, tok, cfg.data.template, records, cfg.train.eval_max_new_tokens,
                              scorer=scorer)
    iteration = GRPOIteration(cfg, ctx, mesh, tok, reward_fn)
    try:
        with jax.set_mesh(mesh):
            state, result = run_loop(cfg, iteration, start.state, prompts, data_state=prompts.state,
                                     checkpointer=start.checkpointer, tokenizer_files=tok.files(),
                                     eval_fn=eval_fn, eval_every=cfg.train.eval_every,
                                     eval_first=start.how != "resume", shown=("reward", "accuracy", "response_length"),
                                     tokens_of=_iteration_tokens)
    finally:
        scorer.close()
        if own_rewards and hasattr(reward_fn, "close"):
            reward_fn.close()
        if start.checkpointer is not None:
            start.checkpointer.close()
    return StageResult(kind="grpo", stop=result.stop, how=start.how, step=result.step, last=result.last,
                       evals=result.evals, history=result.history, state=state, tokenizer=tok, ctx=ctx)
