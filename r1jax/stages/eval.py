"""The evaluation stage driver: `r1jax eval CONFIG` (R1 section 3.1: pass@1 over k samples, cons@k).

Loads the checkpoint checkpoint.init_from and, for each of eval.sets, samples eval.k completions per
problem with the `sampling` section (`evaluate.sample_eval`) and, with eval.greedy, greedy accuracy.
Samples are scored by the GRPO accuracy reward in one pool of reward workers for the whole stage
(`evaluate.eval_scorer`, with the grpo section's reward limits); each set's summary counts what the
scoring met (timeouts, refusals, worker restarts, over-long completions).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from r1jax.checkpoint import write_atomic
from r1jax.config import Config
from r1jax.data.pipeline import heldout
from r1jax.data.sources import EVAL_SETS
from r1jax.errors import ConfigError
from r1jax.evaluate import eval_scorer, greedy_accuracy, sample_eval, write_results
from r1jax.rewards.combine import STAT_KEYS, stats_delta
from r1jax.stages.grpo import reward_limits
from r1jax.stages.result import StageResult, scalars
from r1jax.stages.start import load_policy


def eval_records(cfg: Config, name: str) -> list[dict]:
    """The problems of eval set `name` for config `cfg`: "heldout" is data.eval_split of the configured
    source (eval.examples, else train.eval_examples, of them); gsm8k / math500 / aime2024 the shipped
    test sets (eval.examples of them, 0: all)."""
    if name == "heldout":
        return heldout(cfg.data, cfg.eval.examples or cfg.train.eval_examples)
    source = EVAL_SETS[name]("test")
    n = min(len(source), cfg.eval.examples) if cfg.eval.examples else len(source)
    return [source[i] for i in range(n)]


def run_eval_stage(cfg: Config) -> StageResult:
    """Evaluate checkpoint.init_from on each of eval.sets: greedy accuracy, and pass@1 over eval.k
    samples, pass@k and cons@k. Writes <out>/<set>.jsonl (one line per problem), <out>/<set>.summary.json
    and <out>/summary.json, where <out> is checkpoint.dir (else <checkpoint.init_from>/eval). The
    result's outputs: {"sets": {name: scalar results, with "scoring_<count>" (rewards.combine.STAT_KEYS)
    of sampled and greedy scoring together}}; details: {"out"}."""
    if not cfg.checkpoint.init_from:
        raise ConfigError("checkpoint.init_from: eval needs the checkpoint to evaluate")
    out = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.checkpoint.init_from) / "eval"
    e, s = cfg.eval, cfg.sampling
    policy = load_policy(cfg.checkpoint.init_from)
    if policy.tokenizer is None:
        raise ConfigError(f"checkpoint.init_from: {cfg.checkpoint.init_from} holds no tokenizer")
    results = {}
    scorer = eval_scorer(cfg.data.template, **reward_limits(cfg))
    try:
        with jax.set_mesh(policy.mesh):
            for name in e.sets:
                records = eval_records(cfg, name)
                before = scorer.stats()
                res = sample_eval(policy.graphdef, policy.state, policy.tokenizer, cfg.data.template, records, k=e.k,
                                  max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                  top_k=s.top_k, seed=e.seed, batch_size=e.batch_size, scorer=scorer,
                                  progress=f"eval {name}: sampling")
                if e.greedy:
                    res["greedy"] = greedy_accuracy(policy.graphdef, policy.state, policy.tokenizer,
                                                    cfg.data.template, records, s.max_new_tokens,
                                                    batch_size=e.batch_size, scorer=scorer,
                                                    progress=f"eval {name}: greedy")["accuracy"]
                res["scoring"] = stats_delta(before, scorer.stats())  # sampled and greedy together
                if jax.process_index() == 0:
                    write_results(out / f"{name}.jsonl", res)
                # counts in the stage summary (the <set>.summary.json has the peak RSS and slowest time too)
                results[name] = {**scalars(res), **{f"scoring_{k}": res["scoring"][k] for k in STAT_KEYS}}
    finally:
        scorer.close()
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "summary.json", json.dumps(results, indent=1) + "\n")
    return StageResult(kind="eval", how="fresh", outputs={"sets": results}, details={"out": out})
