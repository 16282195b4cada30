"""Entry points: `r1jax summary`, `r1jax convert` both ways, and the README's main job."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import CONFIGS, GOLDEN, ROOT
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


def test_main_job_runs(tmp_path):
    """What `python3 dev.py run` runs (the venv set-up itself is exercised by .ci/run)."""
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "r1jax.cli", "demo", "--workdir", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "671.03B total" in r.stdout and "HF round trip" in r.stdout and "exact" in r.stdout


@pytest.mark.parametrize("script", ["dev.py"])
def test_dev_script_usage(script):
    r = subprocess.run([sys.executable, str(ROOT / script)], capture_output=True, text=True)
    assert r.returncode == 2 and "python3 dev.py run" in r.stdout
