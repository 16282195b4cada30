"""Entry points: `r1jax summary`, `r1jax convert` both ways, and the README's main job."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CONFIGS, GOLDEN, ROOT, xla_flags
from r1jax.cli import main
from r1jax.convert import Checkpoint


def test_summary(capsys):
    assert main(["summary", str(CONFIGS / "models" / "deepseek_v2_lite.yaml"), "--devices", "16", "--brief"]) == 0
    out = capsys.readouterr().out
    assert "15.71B total" in out and "fsdp=16" in out


def test_bad_key_is_one_line_naming_key_and_file(capsys):
    cfg = str(CONFIGS / "models" / "tiny_v3.yaml")
    assert main(["summary", cfg, "model.n_expert=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "command line: model.n_expert: unknown key" in err
    assert main(["summary", cfg, "--devices", "8", "mesh.tensor=8"]) == 2
    assert "mesh.tensor" in capsys.readouterr().err


def test_convert_both_ways_is_exact_at_the_hf_level(tmp_path, capsys):
    src = GOLDEN / "deepseek_v3"
    assert main(["convert", "hf-to-r1jax", str(src), str(tmp_path / "r1")]) == 0
    assert main(["convert", "r1jax-to-hf", str(tmp_path / "r1"), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    a, b = Checkpoint(src), Checkpoint(tmp_path / "hf")
    assert set(a.names) == set(b.names)
    for n in a.names:
        np.testing.assert_array_equal(a.read(n), b.read(n), err_msg=n)
    # the destination exists now: a second conversion refuses and leaves it as it was
    before = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert main(["convert", "r1jax-to-hf", str(tmp_path / "r1"), str(tmp_path / "hf")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == before
    assert main(["convert", "hf-to-r1jax", str(src), str(tmp_path / "r1")]) == 2
    assert main(["convert", "hf-to-r1jax", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["dev.py"])
def test_dev_script_usage(script):
    r = subprocess.run([sys.executable, str(ROOT / script)], capture_output=True, text=True)
    assert r.returncode == 2 and "python3 dev.py run" in r.stdout


def test_dev_test_runs_files_in_parallel_unless_told_otherwise():
    import importlib.util
    spec = importlib.util.spec_from_file_location("r1jax_dev", ROOT / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    default = dev._parallel([])
    assert default[:2] == ["-n", "auto"] and default[-2:] == ["--dist", "loadfile"]
    assert dev._parallel(["-x", "tests/test_cli.py"]) == default
    for own in (["-n", "0"], ["-n0"], ["--numprocesses=2"], ["--dist", "load"], ["--co", "-q"]):
        assert dev._parallel(own) == [], own


# --------------------------------------------------------------------------------------------------
# Stage commands in a child process: --dry-run plans, one-line errors with exit 2
# --------------------------------------------------------------------------------------------------

# Runs r1jax.cli.main, then prints the child's peak resident set size. VmHWM is the high-water mark of
# this process image only (ru_maxrss would also count the forking parent's pages from before exec).
_MEASURED_MAIN = """
import re, sys
from pathlib import Path
from r1jax.cli import main
rc = main(sys.argv[1:])
hwm = re.search(r"^VmHWM:\\s+(\\d+) kB$", Path("/proc/self/status").read_text(), re.MULTILINE)
print(f"peak_rss_kib {hwm.group(1)}")
sys.exit(rc)
"""


def _cli(*args, measured=False):
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), PYTHONPATH=str(ROOT))
    head = ["-c", _MEASURED_MAIN] if measured else ["-m", "r1jax.cli"]
    return subprocess.run([sys.executable, *head, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120)


def _cli_here(*args) -> subprocess.CompletedProcess:
    """`r1jax ARGS` in this process, for commands refused before any work (no process start-up to pay;
    the first case of test_pipeline_bad_file_... checks the same error through a child process)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return subprocess.CompletedProcess(["r1jax", *map(str, args)], rc, out.getvalue(), err.getvalue())


def _one_line_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    return lines[0]


def test_pipeline_dry_run_plans_every_stage_of_r1_without_allocating():
    import yaml

    path = CONFIGS / "paper" / "pipelines" / "r1.yaml"
    stages = yaml.safe_load(path.read_text())["stages"]
    r = _cli("pipeline", path, "--dry-run", measured=True)
    assert r.returncode == 0, r.stderr[-2000:]
    blocks = r.stdout.split("== stage ")[1:]
    assert [b.split(" ", 1)[0] for b in blocks] == [s["name"] for s in stages] and len(blocks) == 9
    for block, stage in zip(blocks, stages, strict=True):
        assert block.startswith(f"{stage['name']} ({stage['kind']}, {Path(stage['config']).name})"), block[:200]
        assert "memory per device" in block and "peak estimate" in block, block[:2000]
    assert "671.03B params" in blocks[0]  # the full DeepSeek-V3 was planned, not a stand-in
    peak_kib = int(r.stdout.strip().splitlines()[-1].removeprefix("peak_rss_kib "))
    assert 0 < peak_kib < 2 * 2**20, f"dry run peaked at {peak_kib / 2**20:.2f} GiB resident"


def test_dry_run_bad_mesh_override_names_key_and_file():
    cfg = CONFIGS / "paper" / "r1_zero_grpo.yaml"
    line = _one_line_error(_cli_here("grpo", cfg, "--dry-run", "mesh.expert=7"))
    assert "r1_zero_grpo.yaml" in line and "mesh.expert" in line, line


def test_pipeline_bad_file_is_one_line_naming_file_and_key(tmp_path):
    missing = tmp_path / "missing.yaml"
    for run, extra in ((_cli, ()), (_cli_here, ("--dry-run",))):
        line = _one_line_error(run("pipeline", missing, *extra))
        assert str(missing) in line and "not found" in line, line

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: x\ndir: {tmp_path / 'run'}\nstages:\n"
                   f"  - {{name: a, kind: sft, config: {CONFIGS / 'tiny_r1' / 'cold_start.yaml'}, bogus_key: 1}}\n")
    for extra in ((), ("--dry-run",)):
        line = _one_line_error(_cli_here("pipeline", bad, *extra))
        assert str(bad) in line and "bogus_key" in line and "unknown key" in line, line
    assert not (tmp_path / "run").exists()


def test_eval_without_a_checkpoint_names_the_path(tmp_path):
    empty = tmp_path / "no_checkpoint"
    empty.mkdir()
    line = _one_line_error(_cli_here("eval", CONFIGS / "tiny_r1" / "eval.yaml", f"checkpoint.init_from={empty}"))
    assert str(empty) in line and "checkpoint" in line.removeprefix(f"error: {empty}"), line
    assert list(empty.iterdir()) == []  # nothing written into it
