"""The one registry of stage kinds: what each runs, which config sections it reads, how the dry run
sizes it, and how its `StageResult` reads in a terminal and in the pipeline report.

`r1jax.cli` (one command per kind), `r1jax.pipeline` (stages of a pipeline file) and `r1jax.dryrun`
(checks and memory plans) all look kinds up here: a new kind is one entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

from r1jax.config import Config
from r1jax.stages.distill import run_distill
from r1jax.stages.eval import run_eval_stage
from r1jax.stages.grpo import run_grpo
from r1jax.stages.rejection import run_rejection_stage
from r1jax.stages.result import StageResult
from r1jax.stages.reward_model import run_reward_model
from r1jax.stages.sft import run_sft


def _training_lines(headline: str):
    def describe(result: StageResult, label: str) -> list[str]:
        last = result.last
        figure = f"{headline} {last[headline]:.4f}" if headline in last else f"no new step ({headline} not logged)"
        lines = [f"{result.kind} {label}: {result.how} -> step {result.step} ({result.stop}); {figure}"]
        curve = [(h["step"], h["reward"]) for h in result.history if "reward" in h]
        if curve:
            lines.append("reward curve: " + " ".join(f"{s}:{r:.3f}" for s, r in curve))
        lines += [f"held-out accuracy at step {ev['step']}: {ev['accuracy']:.1%} of {ev['n']}"
                  for ev in result.evals if "accuracy" in ev]
        return lines

    return describe


def _rejection_lines(result: StageResult, label: str) -> list[str]:
    rep = result.details.get("report") or {}
    lines = [f"rejection {label}: {result.how}; dataset {result.outputs['dataset']}"]
    for src, s in rep.get("sources", {}).items():
        why = ", ".join(f"{k} {v}" for k, v in s["rejected"].items() if v)
        lines.append(f"  {src}: accepted {s['accepted']} of {s['samples']} ({s['acceptance_rate']:.1%}); "
                     f"rejected: {why or 'none'}")
    if rep:
        lines.append(f"  examples written: {rep['dataset']['examples']} ({rep['mix']['reasoning']} reasoning + "
                     f"{rep['mix']['non_reasoning']} non-reasoning)")
    return lines


def _eval_lines(result: StageResult, label: str) -> list[str]:
    lines = []
    for name, s in result.outputs["sets"].items():
        metrics = ", ".join(f"{k} {v:.1%}" for k, v in s.items() if k.startswith(("pass@", "cons@", "greedy")))
        lines.append(f"eval {name} ({s['n']} problems, k={s['k']}): {metrics}")
    if "out" in result.details:
        lines.append(f"per-problem results: {result.details['out']}")
    return lines


def _loss_figures(result: StageResult) -> str:
    return f"loss {result.last['loss']:.4f}" if "loss" in result.last else "no new step"


def _grpo_figures(result: StageResult) -> str:
    shown = (("reward", "reward {:.3f}"), ("kl", "kl {:.4f}"), ("response_length", "response length {:.1f}"))
    return ", ".join(fmt.format(result.last[k]) for k, fmt in shown if k in result.last)


def _rejection_figures(result: StageResult) -> str:
    o = result.outputs
    rate = o.get("acceptance_rate")
    rate_txt = f"{rate:.1%}" if isinstance(rate, (int, float)) else "-"
    return f"accepted {o.get('accepted')} of {o.get('samples')} ({rate_txt}); {o.get('examples')} examples"


def _eval_figures(result: StageResult) -> str:
    parts = []
    for name, s in result.outputs.get("sets", {}).items():
        cons = next((f"{k} {v:.1%}" for k, v in s.items() if k.startswith("cons@")), "")
        greedy = f", greedy {s['greedy']:.1%}" if "greedy" in s else ""
        parts.append(f"{name}: pass@1 {s.get('pass@1', float('nan')):.1%}, {cons}{greedy}")
    return "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class StageKind:
    """One kind of stage (see the module docstring)."""

    name: str
    run: Callable[[Config], StageResult]
    help: str  # the CLI command's one-line help
    sections: tuple[str, ...]  # the config sections the stage reads (the dry run checks them)
    plan: Literal["train", "grpo", "sampling"]  # the dry run's memory model of one step
    lines: Callable[[StageResult, str], list[str]]  # what the CLI prints when the stage returns
    figures: Callable[[StageResult], str]  # the key metrics column of the pipeline report
    trains: bool = True  # has steps, a loss and held-out evaluations (curves in the report)


STAGES: dict[str, StageKind] = {k.name: k for k in (
    StageKind("sft", run_sft, "supervised fine-tuning stage (resumes from checkpoint.dir)",
              ("train", "optimizer", "data"), "train", _training_lines("loss"), _loss_figures),
    StageKind("grpo", run_grpo, "GRPO reinforcement-learning stage (resumes from checkpoint.dir)",
              ("train", "optimizer", "data", "grpo", "sampling"), "grpo", _training_lines("reward"), _grpo_figures),
    StageKind("rejection", run_rejection_stage, "rejection sampling: verified, readable samples -> an SFT dataset",
              ("data", "rejection", "sampling"), "sampling", _rejection_lines, _rejection_figures, trains=False),
    StageKind("distill", run_distill, "distillation into a student: sequence-level (SFT on samples) or logits",
              ("train", "optimizer", "data", "distill"), "train", _training_lines("loss"), _loss_figures),
    StageKind("rm", run_reward_model, "reward-model stage: Bradley-Terry on preference pairs (resumes)",
              ("train", "optimizer", "data", "rm"), "train", _training_lines("loss"), _loss_figures),
    StageKind("eval", run_eval_stage, "pass@1 over k samples, cons@k, greedy on held-out / GSM8K / MATH-500 / AIME",
              ("eval", "sampling"), "sampling", _eval_lines, _eval_figures, trains=False),
)}
KINDS = tuple(STAGES)
