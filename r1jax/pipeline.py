"""The R1 pipeline as one resumable run (`r1jax pipeline CONFIG`).

A pipeline file names its run directory and lists stages in order; each stage is a stage config
(the same files `r1jax sft|grpo|rejection|distill|eval` take) plus where it starts from:

    name: tiny-r1
    dir: runs/tiny-r1                    # stage <s> runs in <dir>/<s>
    stages:
      - {name: cold_start, kind: sft, config: cold_start.yaml}
      - {name: reasoning_rl, kind: grpo, config: grpo.yaml, init_from: cold_start}
      - {name: rejection, kind: rejection, config: rejection.yaml, init_from: reasoning_rl}
      - {name: sft2, kind: sft, config: sft2.yaml, init_from: /ckpt/base, data_from: rejection}
      - {name: student, kind: distill, config: student.yaml, data_from: rejection}
      - {name: eval_student, kind: eval, config: eval.yaml, init_from: student}
      # optional per stage: teacher_from (distill.mode logits), reward_from (an rm stage or
      # checkpoint: the grpo stage's grpo.reward_model), set: {dotted.key: value, ...}

init_from / teacher_from name an earlier stage (its run directory) or a checkpoint path; data_from
names an earlier rejection stage, whose dataset becomes the stage's training data (data.train_path;
held-out evaluation keeps the stage's data source) and whose tokenizer it uses when it starts from
no checkpoint. R1-Zero is one grpo stage from the base
checkpoint; R1 is the list above (section 2.3 of the paper).

Running it runs the stages in order. A finished stage leaves <dir>/<s>/stage.json and is skipped
on the next run; an unfinished one resumes from its last checkpoint (SFT, GRPO and distillation
resume exactly; rejection sampling and evaluation are deterministic and write their outputs
atomically, so they start again). At the end, and after each stage, <dir>/report.md holds a table of
every stage's key metrics and held-out accuracy, and <dir>/curves.png the loss, reward and accuracy
curves.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import time
from pathlib import Path

from r1jax.config import Config, ConfigError, load_config, read_yaml
from r1jax.stages.registry import KINDS, STAGES
from r1jax.stages.result import StageResult, scalars

STAGE_KEYS = ("name", "kind", "config", "init_from", "data_from", "teacher_from", "reward_from", "set")
DONE = "stage.json"


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str
    config: Path  # the stage config file
    init_from: str = ""  # an earlier stage's name or a checkpoint path
    data_from: str = ""  # an earlier rejection stage
    teacher_from: str = ""  # an earlier stage or a checkpoint path (distill.mode logits)
    reward_from: str = ""  # an earlier rm stage or a checkpoint path (a grpo stage's reward model)
    set: tuple[str, ...] = ()  # "dotted.key=value" overrides


@dataclasses.dataclass(frozen=True)
class Pipeline:
    name: str
    dir: Path
    stages: tuple[StageSpec, ...]
    source: Path  # the pipeline file

    def stage_dir(self, name: str) -> Path:
        return self.dir / name


def _fail(path: Path, where: str, msg: str):
    raise ConfigError(f"{path}: {where}: {msg}")


def load_pipeline(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Read and check a pipeline file. overrides: "dir=...", "seed=N" (every stage's data.seed and
    train.seed: another draw of the data and the initialisation) or "<stage>.<dotted.key>=value"
    (added to that stage's `set`)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: pipeline file not found")
    tree = read_yaml(path, "pipeline file") or {}  # binary, non-UTF-8, duplicate keys: one line each
    if not isinstance(tree, dict):
        _fail(path, "top level", "expected a mapping with name, dir and stages")
    for key in tree:
        if key not in ("name", "dir", "stages"):
            _fail(path, key, "unknown key (known: dir, name, stages)")
    extra: dict[str, list[str]] = {}
    every: list[str] = []  # overrides of every stage (seed=N)
    for text in overrides:
        key, sep, value = text.partition("=")
        if not sep:
            raise ConfigError(f"override {text!r}: expected key=value")
        if key == "dir":
            tree["dir"] = value
        elif key == "seed":
            every += [f"data.seed={value}", f"train.seed={value}"]
        else:
            stage, _, rest = key.partition(".")
            if not rest:
                raise ConfigError(f"override {text!r}: expected dir=... or <stage>.<key>=value")
            extra.setdefault(stage, []).append(f"{rest}={value}")
    if not tree.get("dir"):
        _fail(path, "dir", "missing: the pipeline's run directory")
    stages = tree.get("stages")
    if not isinstance(stages, list) or not stages:
        _fail(path, "stages", "expected a non-empty list of stages")
    specs: list[StageSpec] = []
    for i, st in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(st, dict):
            _fail(path, where, "expected a mapping (name, kind, config, ...)")
        for key in st:
            if key not in STAGE_KEYS:
                _fail(path, f"{where}.{key}", f"unknown key (known: {', '.join(STAGE_KEYS)})")
        name = st.get("name")
        if not isinstance(name, str) or not name or "/" in name or "." in name:
            _fail(path, f"{where}.name", f"expected a plain name, got {name!r}")
        where = f"stage {name}"
        if any(s.name == name for s in specs):
            _fail(path, where, "a second stage with this name")
        if st.get("kind") not in KINDS:
            _fail(path, f"{where}.kind", f"expected one of {', '.join(KINDS)}, got {st.get('kind')!r}")
        if not st.get("config"):
            _fail(path, f"{where}.config", "missing: the stage config file")
        cfg_path = (path.parent / st["config"]).resolve()
        if not cfg_path.is_file():
            _fail(path, f"{where}.config", f"{cfg_path}: not found")
        earlier = {s.name: s for s in specs}
        for key in ("init_from", "data_from", "teacher_from", "reward_from"):
            ref = st.get(key, "")
            if not isinstance(ref, str):
                _fail(path, f"{where}.{key}", f"expected a stage name or a path, got {ref!r}")
            if key == "data_from" and ref:
                if ref not in earlier:
                    _fail(path, f"{where}.data_from", f"{ref!r} is not an earlier stage")
                if earlier[ref].kind != "rejection":
                    _fail(path, f"{where}.data_from", f"{ref!r} is a {earlier[ref].kind} stage, not rejection")
            elif key == "reward_from" and ref and st.get("kind") != "grpo":
                _fail(path, f"{where}.reward_from", f"only a grpo stage takes a reward model, this is {st['kind']}")
            elif key == "reward_from" and ref in earlier and earlier[ref].kind != "rm":
                _fail(path, f"{where}.reward_from", f"{ref!r} is a {earlier[ref].kind} stage, not rm")
            elif ref and ref not in earlier and ("/" not in ref and not Path(ref).exists()):
                _fail(path, f"{where}.{key}", f"{ref!r} is neither an earlier stage nor an existing path")
        sets = st.get("set") or {}
        if not isinstance(sets, dict):
            _fail(path, f"{where}.set", "expected a mapping of dotted keys to values")
        items = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sets.items()]
        specs.append(StageSpec(name=name, kind=st["kind"], config=cfg_path, init_from=st.get("init_from", ""),
                               data_from=st.get("data_from", ""), teacher_from=st.get("teacher_from", ""),
                               reward_from=st.get("reward_from", ""), set=tuple(every + items + extra.pop(name, []))))
    if extra:
        raise ConfigError(f"overrides name unknown stages: {', '.join(extra)}")
    return Pipeline(name=str(tree.get("name", path.stem)), dir=Path(tree["dir"]), stages=tuple(specs), source=path)


def _ref(pipe: Pipeline, ref: str) -> str:
    return str(pipe.stage_dir(ref)) if any(s.name == ref for s in pipe.stages) else ref


def stage_config(pipe: Pipeline, spec: StageSpec) -> Config:
    """The stage's config: its file + the pipeline's wiring + its `set` overrides (which win)."""
    wiring = [f"checkpoint.dir={pipe.stage_dir(spec.name)}"]
    if spec.init_from:
        wiring.append(f"checkpoint.init_from={_ref(pipe, spec.init_from)}")
    if spec.teacher_from:
        wiring.append(f"distill.teacher={_ref(pipe, spec.teacher_from)}")
        if not spec.init_from and not spec.data_from:
            wiring.append(f"tokenizer.path={_ref(pipe, spec.teacher_from)}")  # logits need the same tokens
    if spec.data_from:
        data = pipe.stage_dir(spec.data_from) / "dataset"
        wiring.append(f"data.train_path={data / 'train.jsonl'}")
        if not spec.init_from:
            wiring.append(f"tokenizer.path={data / 'tokenizer'}")
    if spec.reward_from:
        wiring.append(f"grpo.reward_model={_ref(pipe, spec.reward_from)}")
    if spec.kind == "rejection":
        wiring.append("rejection.out=")
    return load_config(spec.config, [*wiring, *spec.set])


def run_stage(cfg: Config, kind: str) -> StageResult:
    """Run one stage of `kind` on `cfg` (the registry's driver). A training stage's evals become every
    evaluation of the stage, also those of runs before a resume (its evals.jsonl, one per step)."""
    if kind not in STAGES:
        raise ConfigError(f"unknown stage kind {kind!r}")
    result = STAGES[kind].run(cfg)
    if result.trains:
        logged = _read_jsonl(Path(cfg.checkpoint.dir) / "evals.jsonl") if cfg.checkpoint.dir else []
        result.evals = logged or [scalars(e) for e in result.evals]
    return result


def run_pipeline(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), log=None) -> dict:
    """Run every unfinished stage of the pipeline file `path` in order. Returns {"stages": {name:
    summary}, "stopped": stage name or None (preempted)}."""
    import jax

    from r1jax.checkpoint import write_atomic

    log = log or (lambda line: print(line, file=sys.stderr, flush=True) if jax.process_index() == 0 else None)
    pipe = load_pipeline(path, overrides)
    configs = {s.name: stage_config(pipe, s) for s in pipe.stages}  # every config checked before any work
    pipe.dir.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict] = {}
    stopped = None
    for spec in pipe.stages:
        done = pipe.stage_dir(spec.name) / DONE
        if done.is_file():
            summaries[spec.name] = json.loads(done.read_text())
            log(f"pipeline {pipe.name}: stage {spec.name} ({spec.kind}) finished earlier; skipped")
            continue
        log(f"pipeline {pipe.name}: stage {spec.name} ({spec.kind}) starts")
        t0 = time.perf_counter()
        result = run_stage(configs[spec.name], spec.kind)
        result.seconds = time.perf_counter() - t0
        summaries[spec.name] = summary = result.summary()
        if summary["stop"] != "done":
            stopped = spec.name
            log(f"pipeline {pipe.name}: stage {spec.name} stopped ({summary['stop']}); run the same command to resume")
            break
        if jax.process_index() == 0:
            pipe.stage_dir(spec.name).mkdir(parents=True, exist_ok=True)
            write_atomic(done, json.dumps(summary, indent=1, default=str))
            write_report(pipe, summaries)
        log(f"pipeline {pipe.name}: stage {spec.name} done in {summary['seconds']:.0f} s")
    if jax.process_index() == 0 and stopped is None:
        write_report(pipe, summaries)
    return {"stages": summaries, "stopped": stopped, "dir": pipe.dir}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def heldout_accuracy(summary: dict) -> float | None:
    """A stage's held-out accuracy from its summary (stage.json): see StageResult.heldout_accuracy."""
    return StageResult.from_summary(summary).heldout_accuracy()


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        rows[row.get("step")] = row  # a resumed run rewrites the steps after its last checkpoint
    return [rows[k] for k in sorted(r for r in rows if r is not None)]


def write_report(pipe: Pipeline, summaries: dict[str, dict]) -> Path:
    """<dir>/report.md (one table row per stage) and <dir>/curves.png."""
    from r1jax.checkpoint import write_atomic

    lines = [f"# Pipeline {pipe.name}", "", f"Run directory `{pipe.dir}`, from `{pipe.source}`.", "",
             "| stage | kind | starts from | steps | key metrics | held-out accuracy | wall |",
             "|---|---|---|---|---|---|---|"]
    for spec in pipe.stages:
        s = summaries.get(spec.name)
        start = ", ".join(x for x in (spec.init_from and f"init {spec.init_from}",
                                      spec.data_from and f"data {spec.data_from}",
                                      spec.teacher_from and f"teacher {spec.teacher_from}",
                                      spec.reward_from and f"reward model {spec.reward_from}") if x) or "scratch"
        if s is None:
            lines.append(f"| {spec.name} | {spec.kind} | {start} | - | not run yet | - | - |")
            continue
        result = StageResult.from_summary(s)
        acc, parts = result.heldout_accuracy(), result.heldout_by_scenario()
        shown = "-" if acc is None else f"{acc:.1%}"
        if parts:
            shown += " (" + ", ".join(f"{k} {v:.1%}" for k, v in parts.items()) + ")"
        figures = STAGES[spec.kind].figures(result)
        lines.append(f"| {spec.name} | {spec.kind} | {start} | {s.get('step', '-')} | {figures} | "
                     f"{shown} | {s.get('seconds', 0):.0f} s |")
    plot = _plot_curves(pipe)
    if plot:
        lines += ["", f"![curves]({plot.name})"]
    return write_atomic(pipe.dir / "report.md", "\n".join(lines) + "\n")


def _plot_curves(pipe: Pipeline) -> Path | None:
    import matplotlib

    from r1jax.checkpoint import write_atomic

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "metrics.jsonl"), ("reward", "metrics.jsonl"), ("accuracy", "evals.jsonl")]
    # Each stage's logs, read once; stages follow each other along x: a stage's steps start where the
    # previous training stage's ended.
    logs = {spec.name: {f: _read_jsonl(pipe.stage_dir(spec.name) / f) for f in ("metrics.jsonl", "evals.jsonl")}
            for spec in pipe.stages}
    offsets, end = {}, 0
    for spec in pipe.stages:
        offsets[spec.name] = end
        end += max((r["step"] for r in logs[spec.name]["metrics.jsonl"]), default=0)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    drawn = False
    for ax, (metric, file) in zip(axes, panels):
        for spec in pipe.stages:
            if not STAGES[spec.kind].trains:
                continue
            rows = [r for r in logs[spec.name][file] if metric in r]
            if rows:
                ax.plot([offsets[spec.name] + r["step"] for r in rows], [r[metric] for r in rows], label=spec.name,
                        marker="o" if metric == "accuracy" else None)
                drawn = True
        ax.set_title(("held-out " if metric == "accuracy" else "") + metric)
        ax.set_xlabel("step (stages in pipeline order)")
        if ax.lines:
            ax.legend()
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    plt.close(fig)
    return write_atomic(pipe.dir / "curves.png", png.getvalue())
