#!/usr/bin/env python3
"""The two set-up commands of r1jax, needing only Python 3.11+.

    python3 dev.py run     # create .venv if needed, install r1jax, run the main job (the tiny R1 pipeline)
    python3 dev.py test    # create .venv if needed, install r1jax[test], run the test suite

Extra arguments after `run` go to the main job; after `test` they go to pytest.
`test` runs the files in parallel (pytest-xdist, one worker per core up to four, each
file on one worker so its module fixtures are built once); `-n 0` runs serially.
`python3 dev.py test --reference ...` also installs torch + transformers so the live
HF parity tests run next to the golden ones.
"""
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _ensure_env(extras: str) -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"r1jax needs Python 3.11+, this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"[dev] creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / f".r1jax-installed-{extras or 'base'}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    print(f"[dev] installing r1jax[{extras}] into {VENV}", flush=True)
    spec = f".[{extras}]" if extras else "."
    # --no-compile: byte-compiling every installed module takes longer than the install itself;
    # Python compiles the modules it imports on first use.
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "--no-compile", "-e", spec], cwd=ROOT, check=True)
    stamp.write_text(digest)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "test"):
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cmd == "run":
        _ensure_env("")
        # The main job: the tiny R1 pipeline (configs/tiny_r1), resumable; extra arguments are its overrides.
        return subprocess.call([str(PY), "-m", "r1jax.cli", "pipeline", "configs/tiny_r1/pipeline.yaml", *rest],
                               cwd=ROOT, env=env)
    extras = "test"
    if "--reference" in rest:
        rest.remove("--reference")
        extras = "test,reference"
    _ensure_env(extras)
    return subprocess.call([str(PY), "-m", "pytest", *_parallel(rest), *rest], cwd=ROOT, env=env)


def _parallel(rest: list[str]) -> list[str]:
    """pytest-xdist arguments unless the caller chose its own `-n` (or asked only to collect)."""
    chosen = any(a.startswith(("-n", "--numprocesses", "--dist")) for a in rest)
    if chosen or any(a in ("--co", "--collect-only") for a in rest):
        return []
    # Each worker is one JAX process with 8 fake CPU devices; more than four buys little and costs memory.
    return ["-n", "auto", "--maxprocesses", "4", "--dist", "loadfile"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
