"""The rejection-sampling stage driver: `r1jax rejection CONFIG` (R1 section 2.3.3).

Samples rejection.samples_per_prompt completions of rejection.prompts prompts of data.split from the
policy checkpoint.init_from (with the `sampling` section), keeps the verified and readable ones,
mixes in non-reasoning data and writes the dataset (`r1jax.rejection`: judge, select, mix,
write_dataset), with the policy's tokenizer beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax

from r1jax.config import Config
from r1jax.data.pipeline import make_source
from r1jax.data.sources import JsonlSource
from r1jax.errors import ConfigError
from r1jax.evaluate import sample_completions
from r1jax.rejection import run_rejection
from r1jax.rewards import RewardFn
from r1jax.rewards.combine import STAT_KEYS
from r1jax.stages.grpo import reward_limits
from r1jax.stages.result import StageResult
from r1jax.stages.start import load_policy


def dataset_dir(cfg: Config) -> Path:
    """Where the rejection stage of `cfg` writes its dataset: rejection.out, else <checkpoint.dir>/dataset."""
    if cfg.rejection.out:
        return Path(cfg.rejection.out)
    if not cfg.checkpoint.dir:
        raise ConfigError("rejection: set rejection.out or checkpoint.dir (where the dataset is written)")
    return Path(cfg.checkpoint.dir) / "dataset"


def _result(how: str, report: dict, out: Path) -> StageResult:
    total = report.get("total", {})
    return StageResult(kind="rejection", how=how, details={"report": report}, outputs={
        "dataset": str(out), "acceptance_rate": total.get("acceptance_rate"), "accepted": total.get("accepted"),
        "samples": total.get("samples"), "rejected": total.get("rejected", {}),
        "examples": (report.get("dataset") or {}).get("examples"),
        "scoring": {k: v for k, v in (report.get("scoring") or {}).items() if k in STAT_KEYS}})  # counts only


def _done(out: Path) -> StageResult:
    return _result("done", json.loads((out / "report.json").read_text()), out)


def run_rejection_stage(cfg: Config) -> StageResult:
    """Sample, select, mix and write the dataset (see the module docstring). A finished dataset
    (report.json and the tokenizer present) is returned as it is, not sampled again."""
    out = dataset_dir(cfg)
    if (out / "report.json").is_file() and (out / "tokenizer").is_dir():
        return _done(out)
    r, s = cfg.rejection, cfg.sampling
    if not cfg.checkpoint.init_from:
        raise ConfigError("checkpoint.init_from: rejection sampling needs the policy checkpoint to sample from")
    source = make_source(cfg.data, cfg.data.split)
    n = min(len(source), r.prompts) if r.prompts else len(source)
    records = [source[i] for i in range(n)]
    non_reasoning = None
    if r.non_reasoning_ratio > 0:
        if not r.non_reasoning_path:
            raise ConfigError("rejection.non_reasoning_path: non_reasoning_ratio > 0 needs a JSONL of non-reasoning examples")
        extra = JsonlSource(r.non_reasoning_path, max_record_bytes=cfg.data.max_record_bytes, oversized=cfg.data.oversized)
        non_reasoning = [extra[i] for i in range(len(extra))]
    policy = load_policy(cfg.checkpoint.init_from)
    if policy.tokenizer is None:
        raise ConfigError(f"checkpoint.init_from: {cfg.checkpoint.init_from} holds no tokenizer to sample with")
    if (out / "report.json").is_file():  # stopped between the dataset and its tokenizer
        _save_tokenizer(policy.tokenizer, out)
        return _done(out)
    calls = []

    def sample(batch: list, k: int) -> list[list[str]]:
        calls.append(len(batch))
        with jax.set_mesh(policy.mesh):
            texts, _ = sample_completions(policy.graphdef, policy.state, policy.tokenizer, cfg.data.template, batch,
                                          k=k, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                          top_p=s.top_p, top_k=s.top_k, seed=r.seed * 100_003 + len(calls),
                                          batch_size=r.prompts_per_batch * k)
        return texts

    # Accuracy in the GRPO reward workers (timeout, memory cap, longest scored completion: the grpo section's).
    reward_fn = RewardFn({"accuracy": 1.0}, template=cfg.data.template, **reward_limits(cfg))
    # Every process samples (the sampler is SPMD over the mesh); process 0's dataset is the one kept.
    target = out if jax.process_index() == 0 else Path(tempfile.mkdtemp(prefix="r1jax-rejection-")) / "dataset"
    try:
        report = run_rejection(sample, records, r, cfg.data.template, target, non_reasoning, reward_fn=reward_fn,
                               overwrite=False, progress=True, sampling=dataclasses.asdict(s))
    finally:
        reward_fn.close()
        if target != out:
            shutil.rmtree(target.parent, ignore_errors=True)
    if jax.process_index() == 0:
        _save_tokenizer(policy.tokenizer, out)
    return _result("fresh", report, out)


def _save_tokenizer(tokenizer, out: Path) -> None:
    """The sampling policy's tokenizer beside its samples (out/tokenizer): a student trained on the
    dataset reads it with tokenizer.path."""
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=out))
    for name, data in tokenizer.files().items():
        (tmp / name).write_bytes(data)
    os.replace(tmp, out / "tokenizer")
