"""The stage loop shared by SFT, GRPO and distillation; it knows nothing of any one of them.

data -> jitted step (donated state, explicit shardings) -> metrics -> checkpoints, with:
  - progress (a bar on a terminal, plain lines in logs: loss, the stage's own figures, tokens/s,
    MFU, ETA), a JSONL metrics file and TensorBoard scalars (process 0 only), each step once: a
    resume drops what was logged after the step it resumes from (those steps run again), and an
    evaluation already logged at a step is not run again (rerunning a finished run adds nothing);
  - SIGTERM / first Ctrl-C (TPU preemption, scheduler kill): finish the current step, save a
    checkpoint at it, wait for the write, and return with stop="preempted";
  - a non-finite loss: stop before anything is saved from the bad step, wait for the last good
    checkpoint to be complete, and raise TrainingDiverged naming the step and that checkpoint.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from r1jax.checkpoint import RunCheckpointer, write_atomic
from r1jax.config import Config
from r1jax.progress import Progress

# Dense bf16 peak FLOP/s per chip by device kind (datasheets); CPU has none, so no MFU there.
PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("B200", 2250e12), ("TPU v6", 918e12),
              ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12))


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((f for name, f in PEAK_FLOPS if name.lower() in kind.lower()), None)


@dataclass
class LoopResult:
    step: int
    stop: str  # "done" | "preempted"
    last: dict = field(default_factory=dict)  # metrics of the last step
    history: list[dict] = field(default_factory=list)  # one entry per logged step
    evals: list[dict] = field(default_factory=list)


class Preemption:
    """Catches SIGTERM (and the first SIGINT) and reports it, agreed across processes."""

    def __init__(self):
        self.flag = False
        self._old: dict = {}

    def __enter__(self):
        def handler(signum, frame):
            self.flag = True
            if signum == signal.SIGINT:  # a second Ctrl-C interrupts for real
                signal.signal(signal.SIGINT, self._old.get(signal.SIGINT, signal.default_int_handler))

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(self.flag))))


def _log_rows(path: Path, upto: int) -> list[dict]:
    """The rows of the JSONL log `path` (one object with a "step" each) up to step `upto`. The file
    is rewritten whole (write_atomic) without the rest: rows after `upto`, which a resume from
    `upto` logs again, and a last line a kill cut short."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= upto:
            rows.append(row)
    if len(rows) != len(lines):
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _agreed(flag: bool) -> bool:
    """Process 0's `flag`, on every process (a decision that a collective computation follows)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


class MetricsLog:
    """Progress (r1jax.progress: a bar on a terminal, a line every log_every steps otherwise) +
    metrics.jsonl + evals.jsonl + TensorBoard under `run_dir` (process 0 only), from `start_step`
    on: what the logs hold after it is dropped on open (`_log_rows`), and TensorBoard hides its
    events after it (tensorboardX's purge_step), so each step is logged once across resumes.

    `shown`: the metrics the progress displays after the loss (a stage picks its own: GRPO shows
    its reward); tokens/s and MFU always follow."""

    def __init__(self, run_dir: str | None, total_steps: int, start_step: int, shown: tuple[str, ...] = ()):
        self.active = jax.process_index() == 0
        self.shown = shown
        self.peak = peak_flops_per_device()
        self.jsonl = self.tb = None
        self.run_dir = run_dir if self.active else None
        self.logged: dict[int, dict] = {}  # metrics rows up to start_step, by step
        self.logged_evals: dict[int, dict] = {}
        if self.active and run_dir:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.logged = {r["step"]: r for r in _log_rows(Path(run_dir) / "metrics.jsonl", start_step)}
            self.logged_evals = {r["step"]: r for r in _log_rows(Path(run_dir) / "evals.jsonl", start_step)}
            self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a")  # noqa: SIM115 (open for the whole run)
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1)
            except ImportError:  # optional at run time
                self.tb = None
        self.progress = Progress(total_steps, "step", "step", initial=start_step, interval=math.inf,
                                 active=self.active)

    def throughput(self, step_tokens: int, seconds: float, flops_per_token: float) -> dict:
        tps = step_tokens / max(seconds, 1e-9)
        out = {"tokens_per_s": tps}
        if self.peak and flops_per_token:
            out["mfu"] = tps * flops_per_token / (self.peak * jax.device_count())
        return out

    def figures(self, metrics: dict) -> dict[str, str]:
        out = {"loss": f"{metrics.get('loss', float('nan')):.4f}"}
        out.update({k: f"{metrics[k]:.3f}" for k in self.shown if k in metrics})
        out["tok/s"] = f"{metrics.get('tokens_per_s', 0):,.0f}"
        if "mfu" in metrics:
            out["mfu"] = f"{metrics['mfu']:.1%}"
        return out

    def write(self, step: int, metrics: dict, print_line: bool) -> None:
        if not self.active:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), step)
        self.progress.update(1, self.figures(metrics), line=print_line)

    def logged_eval(self, step: int) -> dict | None:
        """The evaluation evals.jsonl already holds at `step` (agreed across processes; the others
        get {"step": step}), or None: it is to be run."""
        ev = self.logged_evals.get(step)
        return (ev or {"step": step}) if _agreed(ev is not None) else None

    def eval(self, ev: dict) -> None:
        """Append a held-out evaluation ({"step", "accuracy", ...}) to evals.jsonl (the pipeline report
        plots it) and print it."""
        append_eval(self.run_dir, ev)
        self.message(f"eval at step {ev['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()
                                                                if isinstance(v, float)))

    def message(self, text: str) -> None:
        self.progress.write(text)

    def close(self) -> None:
        self.progress.close()
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def append_eval(run_dir: str | None, ev: dict) -> None:
    """One line of `run_dir`/evals.jsonl: the scalar fields of an evaluation (process 0 only)."""
    if run_dir and jax.process_index() == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(run_dir) / "evals.jsonl", "a") as f:
            f.write(json.dumps({k: v for k, v in ev.items() if isinstance(v, (int, float, str))}) + "\n")


def _batch_tokens(batch: dict, metrics: dict) -> int:
    rows, seq = batch["tokens"].shape
    return rows * seq


def run_loop(cfg: Config, step_fn: Callable, state, batches: Iterator[dict], *, data_state: Callable[[], dict],
             checkpointer: RunCheckpointer | None, tokenizer_files: dict[str, bytes], flops_per_token: float = 0.0,
             eval_fn: Callable | None = None, eval_every: int = 0, eval_first: bool = False,
             shown: tuple[str, ...] = (), tokens_of: Callable[[dict, dict], int] = _batch_tokens,
             ) -> tuple[object, LoopResult]:
    """Train from state.step to cfg.train.steps. Returns (final state, LoopResult).

    step_fn(state, batch, rng) -> (state, metrics) with rng = fold_in(key(train.seed), step);
    `metrics` must hold a "loss" (a non-finite one stops the run). tokens_of(batch, metrics): the
    tokens one step processed, for tokens/s and MFU (default: the batch's rows x length). eval_fn(state)
    -> dict runs every eval_every steps, at the end, and with eval_first before the first step.
    shown: metrics the progress displays besides the loss and throughput."""
    t = cfg.train
    step = int(jax.device_get(state.step))
    rng = jax.random.key(t.seed)
    log = MetricsLog(cfg.checkpoint.dir or None, t.steps, step, shown)
    result = LoopResult(step=step, stop="done")

    def save(force: bool) -> None:
        if checkpointer is not None:
            checkpointer.save(step, state, data_state(), cfg, tokenizer_files, force=force)

    def evaluate() -> None:
        if eval_fn is not None:
            ev = log.logged_eval(step)
            if ev is None:
                ev = dict(eval_fn(state), step=step)
                log.eval(ev)
            result.evals.append(ev)

    try:
        if eval_first:
            evaluate()
        with Preemption() as preempt:
            while step < t.steps:
                t0 = time.perf_counter()
                batch = next(batches)
                state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                step += 1
                if not math.isfinite(metrics["loss"]):
                    last = None
                    if checkpointer is not None:
                        checkpointer.wait()
                        last = checkpointer.latest_step()
                    where = f"the last good checkpoint, step {last}, in {checkpointer.directory} is intact" \
                        if last is not None else "no checkpoint was written"
                    raise TrainingDiverged(f"step {step}: loss is {metrics['loss']}; stopping ({where}).")
                metrics.update(log.throughput(tokens_of(batch, metrics), time.perf_counter() - t0, flops_per_token))
                result.last = metrics
                logged = step % t.log_every == 0 or step == t.steps
                if logged:
                    result.history.append({"step": step, **metrics})
                log.write(step, metrics, print_line=logged)
                if eval_every and step % eval_every == 0 and step < t.steps:
                    evaluate()
                if preempt.requested():
                    save(force=True)
                    result.stop = "preempted"
                    log.message(f"preempted at step {step}: checkpoint saved; run the same command to resume")
                    break
                save(force=step == t.steps)
            if result.stop == "done":
                evaluate()
        if step == result.step and step in log.logged:  # nothing left to train: the logged last step
            result.last = {k: v for k, v in log.logged[step].items() if k != "step"}
    finally:
        if checkpointer is not None:
            checkpointer.wait()
        log.close()
    result.step = step
    return state, result
