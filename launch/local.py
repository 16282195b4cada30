#!/usr/bin/env python3
"""Run an r1jax command as N local processes that form one JAX job (multi-host on one machine).

    python launch/local.py --processes 2 --devices-per-process 4 -- r1jax sft configs/x.yaml ...

Each process gets R1JAX_COORDINATOR_ADDRESS (127.0.0.1:<free port>), R1JAX_NUM_PROCESSES and
R1JAX_PROCESS_ID, JAX_PLATFORMS=cpu and XLA_FLAGS with its fake CPU device count (CPU collectives
go through gloo, see r1jax/distributed.py). Output lines are prefixed with the process id. If a
process fails, the others are given --grace seconds to notice (they should fail on their own when
the coordination service loses the peer) and are then killed. Exit status: the first non-zero
status of any process, else 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"[{prefix}] {line}")
        sys.stdout.flush()


def launch(command: list[str], processes: int, devices_per_process: int, grace: float = 60.0,
           env: dict | None = None) -> int:
    if command and command[0] == "r1jax" and shutil.which("r1jax") is None:
        command = [sys.executable, "-m", "r1jax.cli", *command[1:]]
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(processes):
        penv = dict(os.environ, **(env or {}))
        # The caller's other XLA flags are kept; the fake device count is this launcher's.
        kept = [f for f in penv.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
        penv.update(R1JAX_COORDINATOR_ADDRESS=address, R1JAX_NUM_PROCESSES=str(processes), R1JAX_PROCESS_ID=str(i),
                    JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                    XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices_per_process}", *kept]))
        p = subprocess.Popen(command, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=_pump, args=(p.stdout, f"p{i}"), daemon=True).start()
        procs.append(p)

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    first_failure, failed_at = 0, None
    while any(p.poll() is None for p in procs):
        for p in procs:
            rc = p.poll()
            if rc not in (None, 0) and failed_at is None:
                first_failure, failed_at = rc, time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    codes = [p.returncode for p in procs]
    return first_failure or next((c for c in codes if c), 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--devices-per-process", type=int, default=4)
    ap.add_argument("--grace", type=float, default=60.0, help="seconds the others get after one process fails")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command after --")
    return launch(cmd, args.processes, args.devices_per_process, args.grace)


if __name__ == "__main__":
    sys.exit(main())
