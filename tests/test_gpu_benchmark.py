"""benchmarks/gpu.py, the accelerator benchmark script, at its tiny size on CPU: every section runs
and reports finite positive figures; MFU and the HBM share are n/a without a peak for the device
(CPU is in neither table) and figures when one is given."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT, xla_flags

SCRIPT = ROOT / "benchmarks" / "gpu.py"
SHARES = ("mfu", "mfu_palm", "hbm_share", "flops_share", "generation_share")


def gpu_module():
    """benchmarks/gpu.py imported as a module (it has no import-time side effects)."""
    spec = importlib.util.spec_from_file_location("r1jax_gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_script(tmp_path, *args):
    """The script in a subprocess on one CPU device, without the test session's compilation cache."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1), PYTHONUNBUFFERED="1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--out", str(out), *args], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    return json.loads(out.read_text()), r.stdout


def figures(row: dict):
    """(key, value) of every number in a row, lists of timings included."""
    for key, value in row.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                yield key, v


@pytest.mark.slow
def test_tiny_run_reports_every_section(tmp_path):
    """One run of every section, with --peak-tflops given (MFU is a figure) and no HBM bandwidth
    (CPU is not in the table, so the decode shares of the HBM bound are n/a)."""
    res, stdout = run_script(tmp_path, "--peak-tflops", "50")
    assert res["platform"] == "cpu" and res["compilation_cache"] is False
    assert res["peak_flops_per_device"] == 50e12 and res["peak_flops_from"] == "--peak-tflops"
    assert res["hbm_bytes_per_s"] is None
    for key in ("device_kind", "jax_version", "flax_version", "date"):
        assert res[key], key
    assert set(res["sections"]) == {"sft", "decode", "grpo", "gmm"}
    for name, rows in res["sections"].items():
        assert isinstance(rows, list) and rows, (name, rows)
        for row in rows:
            for key, v in figures(row):
                assert math.isfinite(v) and (v > 0 or key == "loss"), (name, key, v)  # GRPO's loss has either sign
            for key in SHARES:
                if row.get(key) is not None:
                    assert 0 < row[key] <= 1, (name, key, row[key])
        assert f"### {name}:" in stdout
    sft, decode, grpo = (res["sections"][k] for k in ("sft", "decode", "grpo"))
    assert [r["seq_len"] for r in sft] == [128, 512]
    assert all(r["mfu"] is not None and r["mfu_palm"] > r["mfu"] for r in sft)  # PaLM's attention term is 2x
    assert [r["batch"] for r in decode] == [1, 8]
    assert all(r["hbm_share"] is None and r["hbm_bound_tokens_per_s"] is None for r in decode)
    assert all(r["flops_share"] is not None for r in decode)
    (g,) = grpo
    assert g["sampled_tokens"] == 2 * 4 * 16  # eos is never sampled: every row runs to N
    assert g["rollout_s"] < g["iteration_s"]
    assert "| tokens/row |" in stdout and "| batch |" in stdout and "generation share" in stdout
    assert [r["impl"] for r in res["sections"]["gmm"]] == ["tiled", "ragged_dot"]  # mosaic_gpu: Hopper only


def test_peaks_are_na_on_cpu_unless_given():
    gpu = gpu_module()
    none = gpu.peaks(SimpleNamespace(peak_tflops=0.0, hbm_tbs=0.0))
    assert (none.flops, none.hbm) == (None, None)  # the test session runs on CPU
    given = gpu.peaks(SimpleNamespace(peak_tflops=100.0, hbm_tbs=2.0))
    assert (given.flops, given.flops_from, given.hbm, given.hbm_from) == (100e12, "--peak-tflops", 2e12, "--hbm-tbs")
    assert gpu.share(3.0, None) is None and gpu.share(1.0, 4.0) == 0.25
    section = gpu.SECTIONS["sft"]
    table = gpu.markdown(section, [{"seq_len": 128, "mfu": None}])
    assert table.splitlines()[2].startswith("| 128 |") and "n/a" in table


def test_sections_flag_names_the_known_ones(capsys):
    gpu = gpu_module()
    assert gpu.parse(["--sections", "grpo,sft"]).sections == ["grpo", "sft"]
    with pytest.raises(SystemExit):
        gpu.parse(["--sections", "sft,kernels"])
    assert "unknown ['kernels'] (known: sft, decode, grpo, gmm)" in capsys.readouterr().err


def test_full_size_flops_per_token_follow_palm():
    """6N + 12LHQT for Qwen2.5-1.5B at 4k: N = 1.54B matmul parameters (the tied table as the head),
    L 28, H 12, Q 128; the causal count halves the attention term (mean context (T + 1) / 2)."""
    gpu = gpu_module()
    cfg = gpu.load(gpu.SIZES["full"], "train.seq_len=4096")
    causal, palm = gpu.sft_flops_per_token(cfg, 4096)
    n = 1_543_714_304
    assert palm == 6 * n + 12 * 28 * 12 * 128 * 4096
    assert causal == 6 * n + 6 * 28 * 12 * 128 * 4097
