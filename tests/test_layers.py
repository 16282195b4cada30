"""The package's shape: its import graph has no cycle, imports point one way (models <- update
functions <- stage drivers <- pipeline / cli), the math modules import no driver, and every
stage kind is one registry entry that the CLI, the pipeline and the dry run all read."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "r1jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the r1jax modules it imports anywhere in its file (top level or inside functions:
    a deferred import is still a dependency)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "r1jax.stages.grpo" in graph["r1jax.stages.registry"]  # the walk sees the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# What each layer may not import: models know nothing of training; update functions nothing of
# files, data, rewards or drivers; drivers nothing of the pipeline or the command line.
ABOVE = {
    "r1jax.models": ("r1jax.train", "r1jax.stages", "r1jax.pipeline", "r1jax.cli", "r1jax.dryrun",
                     "r1jax.checkpoint", "r1jax.data", "r1jax.rewards", "r1jax.evaluate", "r1jax.rejection",
                     "r1jax.tokenizer", "r1jax.sampling"),
    "r1jax.sampling": ("r1jax.train", "r1jax.stages", "r1jax.pipeline", "r1jax.cli"),
    "r1jax.train": ("r1jax.stages", "r1jax.pipeline", "r1jax.cli", "r1jax.dryrun", "r1jax.checkpoint", "r1jax.data",
                    "r1jax.rewards", "r1jax.evaluate", "r1jax.rejection", "r1jax.tokenizer", "r1jax.sampling"),
    "r1jax.rewards": ("r1jax.train", "r1jax.stages", "r1jax.pipeline", "r1jax.cli", "r1jax.evaluate"),
    "r1jax.metrics": ("r1jax.train", "r1jax.stages", "r1jax.pipeline", "r1jax.cli", "r1jax.evaluate",
                      "r1jax.sampling", "r1jax.models"),
    "r1jax.evaluate": ("r1jax.train", "r1jax.stages", "r1jax.pipeline", "r1jax.cli"),
    "r1jax.rejection": ("r1jax.train", "r1jax.stages", "r1jax.pipeline", "r1jax.cli", "r1jax.evaluate"),
    "r1jax.stages": ("r1jax.pipeline", "r1jax.cli", "r1jax.dryrun"),
}


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_imports_point_one_way(layer):
    graph = import_graph()
    bad = sorted((m, d) for m, deps in graph.items() if m == layer or m.startswith(layer + ".")
                 for d in deps for up in ABOVE[layer] if d == up or d.startswith(up + "."))
    assert not bad, f"{layer} imports from a layer above it: {bad}"


def test_importing_the_losses_imports_no_stage_driver():
    code = ("import sys, r1jax.train.losses, r1jax.train.grpo, r1jax.train.update\n"
            "print(' '.join(m for m in sys.modules if m.startswith(('r1jax.stages', 'r1jax.pipeline', 'r1jax.cli', "
            "'r1jax.evaluate', 'r1jax.data', 'r1jax.rewards', 'r1jax.checkpoint'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"importing the update functions pulled in: {out.stdout}"


def test_metrics_import_no_jax():
    code = "import sys, r1jax.metrics; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", (out.stdout, out.stderr[-2000:])


def test_every_stage_kind_is_a_command_a_pipeline_kind_and_a_dry_run_kind(tmp_path):
    from r1jax import cli, pipeline
    from r1jax.dryrun import plan_memory
    from r1jax.stages.registry import STAGES

    assert set(STAGES) == {"sft", "grpo", "rejection", "distill", "eval", "rm"}
    assert pipeline.KINDS == tuple(STAGES)
    for name in STAGES:
        with pytest.raises(SystemExit) as e:  # each kind is a subcommand: its --help exits 0
            cli.main([name, "--help"])
        assert e.value.code == 0
    with pytest.raises(ValueError, match="unknown stage kind 'nope'"):
        plan_memory(None, "nope")


def test_stage_result_round_trips_through_its_summary():
    from r1jax.stages.result import StageResult

    train = StageResult(kind="sft", how="resume", step=7, last={"loss": 0.5, "flag": True, "name": "x"},
                        evals=[{"step": 7, "accuracy": 0.25, "n": 4, "samples": []}], history=[{"step": 7}],
                        seconds=3.0, state=object())
    s = train.summary()
    assert s == {"stop": "done", "how": "resume", "step": 7, "last": {"loss": 0.5},
                 "evals": [{"step": 7, "accuracy": 0.25, "n": 4}], "kind": "sft", "seconds": 3.0}
    back = StageResult.from_summary(s)
    assert back.summary() == s and back.trains and back.heldout_accuracy() == 0.25
    ev = StageResult(kind="eval", outputs={"sets": {"heldout": {"pass@1": 0.5, "greedy": 0.75}}},
                     details={"out": "/x"})
    assert "out" not in ev.summary() and not ev.trains
    assert StageResult.from_summary(ev.summary()).heldout_accuracy() == 0.75


def test_one_grpo_iteration_reads_as_six_named_parts_in_one_screen():
    """Issue 10: GRPOIteration.__call__ calls rollout -> score -> advantages and masks -> log-prob
    passes -> updates -> metrics, in that order, in one short function, and each part says in its
    docstring what goes in and out."""
    tree = ast.parse((PACKAGE / "stages" / "grpo.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GRPOIteration")
    methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
    call = methods["__call__"]
    called = [n.func.attr for n in ast.walk(call) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and isinstance(n.func.value, ast.Name) and n.func.value.id == "self"]
    called.sort(key=lambda name: next(n.lineno for n in ast.walk(call) if isinstance(n, ast.Attribute)
                                      and n.attr == name))
    parts = ["rollout", "score", "advantages_and_masks", "logprob_passes", "updates", "metrics"]
    assert [c for c in called if c in parts] == parts, called
    assert call.end_lineno - call.lineno + 1 <= 30, "one screen"
    for name in parts:
        assert ast.get_docstring(methods[name]), f"GRPOIteration.{name} has no docstring"
