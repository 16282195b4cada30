"""What a stage run returns (`StageResult`), and what a finished pipeline stage keeps of it (stage.json)."""

from __future__ import annotations

import dataclasses
from typing import Any

_SUMMARY_KEYS = ("kind", "stop", "how", "seconds", "step", "last", "evals")


def scalars(d: dict | None) -> dict:
    """The int / float entries of `d` (bools and everything else left out)."""
    return {k: v for k, v in (d or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclasses.dataclass
class StageResult:
    """One stage run (`r1jax.stages.registry.STAGES[kind].run(cfg)`).

    Training stages (sft, grpo, distill) fill step / last / evals / history; rejection and eval put
    their figures in `outputs` (rejection: dataset, acceptance_rate, accepted, samples, rejected,
    examples; eval: sets). `summary()` is the JSON the pipeline writes to stage.json: everything but
    history and the in-memory objects (details, state, tokenizer, ctx)."""

    kind: str
    stop: str = "done"  # "done" | "preempted"
    how: str = "fresh"  # "resume" | "hand-off" | "fresh" | "done" (the output was already there)
    step: int | None = None  # training stages: the step reached
    last: dict = dataclasses.field(default_factory=dict)  # metrics of the last step
    evals: list[dict] = dataclasses.field(default_factory=list)  # held-out evaluations
    history: list[dict] = dataclasses.field(default_factory=list)  # metrics of every logged step
    outputs: dict = dataclasses.field(default_factory=dict)  # kind-specific figures (kept in stage.json)
    seconds: float = 0.0
    details: dict = dataclasses.field(default_factory=dict)  # not kept: rejection "report", eval "out"
    state: Any = None
    tokenizer: Any = None
    ctx: Any = None

    @property
    def trains(self) -> bool:
        return self.step is not None

    def summary(self) -> dict:
        """stage.json: kind, stop, how, seconds (+ step, last, evals of a training stage) + outputs."""
        out: dict = {"stop": self.stop, "how": self.how}
        if self.trains:
            out.update(step=self.step, last=scalars(self.last), evals=[scalars(e) for e in self.evals])
        out.update(self.outputs)
        out.update(kind=self.kind, seconds=self.seconds)
        return out

    @classmethod
    def from_summary(cls, summary: dict) -> StageResult:
        """The result a stage.json describes (history and in-memory objects empty)."""
        base = {k: summary[k] for k in _SUMMARY_KEYS if k in summary}
        return cls(**base, outputs={k: v for k, v in summary.items() if k not in _SUMMARY_KEYS})

    def heldout_accuracy(self) -> float | None:
        """The last held-out evaluation of a training stage; an eval stage's heldout greedy accuracy
        (else pass@1; else its first set's)."""
        sets = self.outputs.get("sets")
        if sets is not None:
            h = sets.get("heldout") or next(iter(sets.values()), {})
            return h.get("greedy", h.get("pass@1"))
        evals = [e for e in self.evals if "accuracy" in e]
        return evals[-1]["accuracy"] if evals else None

    def heldout_by_scenario(self) -> dict[str, float]:
        """The last held-out evaluation's accuracy per scenario ({"general": ..., "reasoning": ...})
        when its records mixed scenarios (data.general_share); else {}."""
        evals = [e for e in self.evals if "accuracy" in e]
        last = evals[-1] if evals else {}
        return {k[len("accuracy_"):]: v for k, v in sorted(last.items()) if k.startswith("accuracy_")}
