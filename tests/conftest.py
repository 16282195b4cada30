"""Test setup: 8 fake CPU devices for the sharding tests (must precede the first jax import)."""

import os
import sys
import tempfile
from pathlib import Path


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process (this one, or a subprocess) with `devices` fake CPU devices.

    Compiling, not running, is what the tiny test programs spend their time on, so two costly parts
    of XLA:CPU's compiler are turned off: LLVM's optimisation of the generated code (half of the
    compile time), and the MLIR fusion emitters, which lower each fusion through an MLIR pipeline
    (a third of what is left; the elemental emitters they replaced compile the same fusions in one
    step). The HLO passes (fusion, SPMD partitioning, buffer assignment: what the memory and HLO
    tests measure) still run unchanged; a test that reads what the emitters themselves produce (the
    sampler's in-place cache writes, test_sampler_memory.py) compiles with them on."""
    return (f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
            " --xla_cpu_use_fusion_emitters=false")


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for this session and every subprocess it starts: the whole-run
# tests compile the same step functions again and again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def devices8():
    devs = jax.devices()
    if len(devs) < 8:
        pytest.fail(f"sharding tests need 8 devices; XLA_FLAGS gave {len(devs)} (was jax imported before conftest?)")
    return devs[:8]


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """This test's own temp dir for worker and sandbox directories, so that tests running in
    parallel (pytest -n) never see each other's."""
    root = os.path.realpath(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", root)
    monkeypatch.setenv("TMPDIR", root)
    return root
