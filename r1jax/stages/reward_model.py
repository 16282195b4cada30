"""The reward-model stage driver: `r1jax rm CONFIG` (R1 section 2.3.4: the preference reward models).

Preference pairs (data/preferences.py) -> the jitted `train.reward_model.reward_model_step` in the
shared stage loop, with held-out pair accuracy as its evaluation and Orbax checkpoints; resumable
like every training stage. The model is the config's decoder with a scalar head
(model.score_head: true); checkpoint.init_from an SFT or RL stage starts from that decoder with a
fresh head.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from r1jax.config import Config, ConfigError
from r1jax.data.preferences import PairLoader, encode_pairs, preference_source
from r1jax.evaluate import _to_host
from r1jax.sharding import batch_sharding
from r1jax.stages.loop import run_loop
from r1jax.stages.result import StageResult
from r1jax.stages.start import start_stage
from r1jax.train.reward_model import pair_scores, reward_model_step
from r1jax.train.state import make_context, train_state_shardings


class _Corpus:
    """Pair records as the tokenizer trainer reads examples (prompt, and both responses as text)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        r = self.source[i]
        return {"question": r["question"], "reasoning": f"{r['chosen']} {r['rejected']}", "answer": ""}


def pair_accuracy_fn(graphdef: nnx.GraphDef, mesh, tok, cfg: Config, records: list[dict]):
    """The stage loop's eval_fn: held-out pair accuracy (share of pairs scored r_c > r_r) and the
    mean gap r_c - r_r of a train state on `records`, in batches of train.batch_size pairs (the
    last padded; one compilation). None without records."""
    if not records:
        return None
    score = jax.jit(lambda params, bias, batch: pair_scores(nnx.merge(graphdef, params, bias), batch)[:2])
    b, rows, vec = cfg.train.batch_size, batch_sharding(mesh), batch_sharding(mesh, 1)

    def eval_fn(state) -> dict:
        right, gaps = 0, []
        with jax.set_mesh(mesh):
            for start in range(0, len(records), b):
                chunk = records[start:start + b]
                arrays = encode_pairs(chunk + [chunk[-1]] * (b - len(chunk)), tok, cfg.data.template, cfg.train.seq_len,
                                      cfg.rm.view)
                batch = {k: jax.make_array_from_callback(v.shape, vec if v.ndim == 1 else rows,
                                                         lambda index, v=v: v[index]) for k, v in arrays.items()}
                c, r = (_to_host(x)[:len(chunk)] for x in score(state.params, state.router_bias, batch))
                right += int(np.sum(c > r))
                gaps.extend((c - r).tolist())
        return {"accuracy": right / len(records), "n": len(records), "reward_gap": float(np.mean(gaps))}

    return eval_fn


def run_reward_model(cfg: Config) -> StageResult:
    """Run (or resume) a reward-model stage on cfg.data's preference pairs."""
    if not cfg.model.score_head:
        raise ConfigError("model.score_head: a reward-model stage trains a scalar head; set model.score_head: true")
    source = preference_source(cfg.data, cfg.data.split)
    ctx = make_context(cfg, loss=cfg.rm.margin)
    start = start_stage(cfg, _Corpus(source), ctx=ctx)
    mesh, tok = start.mesh, start.tokenizer
    loader = PairLoader(source, tok, cfg, batch_sharding(mesh), batch_sharding(mesh, 1))
    if start.data_state is not None:
        loader.restore(start.data_state)
    shardings = train_state_shardings(ctx, mesh)
    step_fn = jax.jit(functools.partial(reward_model_step, ctx=ctx), donate_argnums=0,
                      in_shardings=(shardings, None, None), out_shardings=(shardings, None))
    records = []
    if cfg.train.eval_examples:
        held = preference_source(cfg.data, cfg.data.eval_split, cfg.rm.eval_path)
        records = [held[i] for i in range(min(cfg.train.eval_examples, len(held)))]
    eval_fn = pair_accuracy_fn(ctx.graphdef, mesh, tok, cfg, records)

    def tokens_of(batch: dict, metrics: dict) -> int:  # both sides of every pair
        rows, seq = batch["chosen_tokens"].shape
        return 2 * rows * seq

    try:
        with jax.set_mesh(mesh):
            state, result = run_loop(cfg, step_fn, start.state, loader, data_state=loader.state,
                                     checkpointer=start.checkpointer, tokenizer_files=tok.files(),
                                     eval_fn=eval_fn, eval_every=cfg.train.eval_every, shown=("accuracy",),
                                     tokens_of=tokens_of)
    finally:
        if start.checkpointer is not None:
            start.checkpointer.close()
    return StageResult(kind="rm", stop=result.stop, how=start.how, step=result.step, last=result.last,
                       evals=result.evals, history=result.history, state=state, tokenizer=tok, ctx=ctx)


class RolloutRewardModel:
    """A frozen reward model (grpo.reward_model: an `r1jax rm` run directory or step) that scores
    GRPO rollouts in-graph on the training mesh: `scores(tokens, prompt_lengths, lengths)` -> float32
    [N] (a global array), the rows read as the model's own rm.view says, in `micro` microbatches
    (lax.map), so a pass holds one microbatch's activations."""

    def __init__(self, path: str, cfg: Config, mesh, tok, micro: int = 1):
        from r1jax.stages.start import load_policy
        from r1jax.train.reward_model import rollout_rows
        from r1jax.train.update import microbatches

        axes = ("data", "fsdp", "expert", "tensor")
        rm = load_policy(path, [f"mesh.{a}={getattr(cfg.mesh, a)}" for a in axes])
        if not rm.cfg.model.score_head:
            raise ConfigError(f"grpo.reward_model: {path} is not a reward model (its model.score_head is false)")
        if rm.tokenizer is None or rm.tokenizer.files() != tok.files():
            raise ConfigError(f"grpo.reward_model: {path} has another tokenizer than the policy's (it must read "
                              "the rollouts' token ids)")
        think_end = tok.encode("</think>")
        if len(think_end) != 1:
            raise ConfigError("grpo.reward_model: the tokenizer has no single </think> id")
        self.view, self.state, graphdef = rm.cfg.rm.view, rm.state, rm.graphdef
        pad = tok.pad_id

        def score(state, tokens, plens, lengths):
            model = nnx.merge(graphdef, state)
            rows, seg, last = rollout_rows(tokens, plens, lengths, self.view, think_end[0], pad)
            batch = {"tokens": rows, "segment_ids": seg, "last": last}
            if micro == 1:
                return model.score(rows, last, None, seg)[0]
            out = jax.lax.map(lambda mb: model.score(mb["tokens"], mb["last"], None, mb["segment_ids"])[0],
                              microbatches(batch, micro))  # [micro, N / micro], rows j, j + micro, ...
            return out.swapaxes(0, 1).reshape(-1)

        self._score = jax.jit(score)

    def scores(self, tokens, prompt_lengths, lengths) -> np.ndarray:
        """Host float32 [N] on every process."""
        return np.asarray(_to_host(self._score(self.state, tokens, prompt_lengths, lengths)), np.float32)


class HiddenPreferenceScorer:
    """Held-out scoring of prompts that mix scenarios (data.general_share): reasoning records by
    `inner` (the rule checker, its "accuracy"), general ones by the procedural task's hidden
    preference (`procedural.parity_preference` of the record's number), which no rule reward
    sees. A Scorer: (texts, records) -> {"accuracy": [N]}; stats() and close() are inner's."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, texts: list[str], records: list[dict]) -> dict:
        from r1jax.data.procedural import parity_preference

        out = np.zeros(len(texts), np.float32)
        general = [i for i, r in enumerate(records) if r.get("scenario") == "general"]
        reasoning = [i for i in range(len(texts)) if i not in set(general)]
        if reasoning:
            out[reasoning] = np.asarray(self.inner([texts[i] for i in reasoning],
                                                   [records[i] for i in reasoning])["accuracy"], np.float32)
        for i in general:
            out[i] = parity_preference(records[i]["number"], texts[i])
        return {"accuracy": out}

    def stats(self):
        stats = getattr(self.inner, "stats", None)
        return stats() if callable(stats) else {}

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()
