"""Code reward (R1 section 2.2.2: "for LeetCode problems, a compiler can be used to generate feedback
based on predefined test cases"): run the generated program on each test's stdin in a sandbox and
compare its stdout with the expected one.

The sandbox's wall is the kernel, not Python: each test case runs `python -I -S sandbox_runner.py`
(`r1jax/rewards/sandbox_runner.py`, standard library only) in a new session with a minimal
environment, stdin/stdout/stderr through files, and the runner puts the program, before its first
line, in its own user, PID, mount, network, IPC and UTS namespaces: a read-only root holding only
/usr, /lib* and the interpreter, a fresh /proc and /dev, and a working directory that is a tmpfs of
`disk_mb` (the total disk quota: 64 MB by default; 16 MB per file, also for the captured stdout);
as uid nobody when started as root; no capabilities; rlimits (address space, CPU seconds, threads,
file size, 64 open files, no core dumps); no-new-privileges; and a seccomp filter that refuses new
processes, execve, namespaces, mounts, ptrace, bpf, io_uring, keyrings, and sockets other than
AF_UNIX (the full list in the runner's docstring). A PID-namespace reaper runs the program and
exits when it does, and the kernel then kills whatever is left in the namespace; the host kills
the runner's process group at the wall-clock limit and waits until the reaper is gone, so nothing
outlives a call. A PEP 578 audit hook stays in front as an early, friendly refusal (sockets,
subprocesses, ctypes, writes outside the working directory), not as the wall: a program can switch
it off and is still inside all of the above.

A host without what this needs (unprivileged user namespaces where r1jax is not root, a seccomp
filter for its architecture), or where R1JAX_SANDBOX_DISABLED is set, does not score code with less: `sandbox_report()` says why and
`run_program` raises `SandboxUnavailable` with that reason. Whatever fails in a program (timeout,
crash, non-zero exit, wrong output) scores 0 for that test.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from r1jax.rewards.answer import answer_tag

OUTPUT_CAP_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE: per file, also the captured stdout
DISK_MB = 64  # the working directory's tmpfs: every file the program writes, together
MAX_PROCESSES = 32  # RLIMIT_NPROC headroom (threads: new processes are refused outright)
NOBODY = 65534
SCRATCH_ENV = "R1JAX_SANDBOX_DIR"  # where sandbox directories go (default: the system temp dir)
DISABLED_ENV = "R1JAX_SANDBOX_DISABLED"  # set (non-empty): this host runs no submitted code at all
RUNNER = Path(__file__).with_name("sandbox_runner.py")
SETUP_FAILED = 113  # the runner's exit status when it could not build the sandbox


class SandboxUnavailable(RuntimeError):
    """This host cannot give the code sandbox its boundary; the message says which part and why."""


@dataclass(frozen=True)
class RunResult:
    """What one sandboxed run did. `returncode` is negative for a signal (-9: killed)."""

    stdout: str
    stderr: str
    returncode: int
    timed_out: bool
    elapsed: float
    pgid: int


# --------------------------------------------------------------------------------------------------
# Host capabilities, probed once per process
# --------------------------------------------------------------------------------------------------

_setup_lock = threading.Lock()
_setup: dict[str, Any] | None = None


def sandbox_report() -> dict[str, Any]:
    """What this host gives the sandbox, probed once per process by running a program in it:
    {"ok": bool, "error": why not (or None), "python": interpreter, "root": the caller is root,
    "uid": the program's uid, "drop_uid": it runs as nobody, "netns"/"pidns"/"mntns"/"userns": it
    has its own namespace of that kind}."""
    global _setup
    with _setup_lock:
        if _setup is None:
            info: dict[str, Any] = {"python": sys.executable, "root": os.getuid() == 0, "ok": False, "error": None}
            if os.environ.get(DISABLED_ENV):
                info["error"] = f"running submitted code is switched off on this host ({DISABLED_ENV} is set)"
                _setup = info
                return dict(info)
            try:
                res, _ = _run(sys.executable, "", "", timeout=20.0, memory_mb=512, probe=True)
                mine = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ("net", "pid", "mnt", "user")}
                if res.returncode != 0:
                    info["error"] = f"the sandbox probe exited {res.returncode}: {res.stderr.strip()[-300:]}"
                else:
                    inside = json.loads(res.stdout)
                    info.update(uid=inside["uid"], drop_uid=inside["uid"] == NOBODY,
                                **{f"{ns}ns" if ns != "mnt" else "mntns": inside[ns] != mine[ns] for ns in mine})
                    info["ok"] = all(info[k] for k in ("netns", "pidns", "mntns", "userns"))
                    if not info["ok"]:
                        info["error"] = f"the sandbox shares a namespace with the host: {inside}"
            except SandboxUnavailable as e:
                info["error"] = str(e)
            except (OSError, ValueError, KeyError) as e:
                info["error"] = f"the sandbox probe failed: {e}"
            _setup = info
        return dict(_setup)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------

def _limits(timeout: float, memory_mb: int) -> dict[str, int]:
    uid = NOBODY if os.getuid() == 0 else os.getuid()
    return {
        "RLIMIT_AS": int(memory_mb) * 1024 * 1024,
        "RLIMIT_CPU": int(timeout) + 1,
        "RLIMIT_NPROC": _count_processes(uid) + MAX_PROCESSES,
        "RLIMIT_FSIZE": OUTPUT_CAP_BYTES,
        "RLIMIT_NOFILE": 64,
        "RLIMIT_CORE": 0,
    }


def _count_processes(uid: int) -> int:
    """Processes of `uid` now (RLIMIT_NPROC counts them all, not just the sandbox's)."""
    count = 0
    try:
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    count += os.stat(f"/proc/{name}").st_uid == uid
                except OSError:
                    pass
    except OSError:
        return 4096
    return count


def _wait_fd(fd: int, timeout: float) -> bool:
    poller = select.poll()  # not select.select: fds above 1023 are common next to JAX
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(timeout, 0.0) * 1000))


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to `timeout` s for `proc` to exit without reaping it (so its pid keeps naming the process
    group until we kill the group). True if it exited."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            return _wait_fd(fd, timeout)
        finally:
            os.close(fd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        time.sleep(0.005)
    return False


def _drain_group(pgid: int, seconds: float = 2.0) -> None:
    """SIGKILL the group until it is empty (forked children take a moment to die), at most `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.002)


def _read(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _read_status(fd: int) -> str:
    """What the runner wrote on the status pipe (its writers are gone by now: no blocking)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _kill_reaper(status: str, wait: float) -> None:
    """SIGKILL the sandbox's PID-namespace reaper named on the status pipe (with it, the kernel kills
    everything in the namespace) and wait up to `wait` s until it is gone. A pidfd names it, so a
    recycled pid is never signalled."""
    m = re.match(r"pid (\d+)\n", status)
    if m is None:
        return
    try:
        fd = os.pidfd_open(int(m.group(1)))
    except (AttributeError, OSError):
        return  # gone already
    try:
        if not _wait_fd(fd, 0):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            _wait_fd(fd, wait)
    except OSError:
        pass
    finally:
        os.close(fd)


def _run(python: str, program: str, stdin: str, *, timeout: float, memory_mb: int, disk_mb: int = DISK_MB,
         probe: bool = False) -> tuple[RunResult, str]:
    """One sandboxed run: (result, what the runner reported on its status pipe)."""
    tmp = os.path.realpath(tempfile.mkdtemp(prefix="r1jax-sandbox-", dir=os.environ.get(SCRATCH_ENV) or None))
    read_end = write_end = -1
    try:
        os.chmod(tmp, 0o700)
        with open(os.path.join(tmp, "prog.py"), "w", encoding="utf-8") as f:
            f.write(program)
        with open(os.path.join(tmp, "stdin"), "w", encoding="utf-8") as f:
            f.write(stdin)
        read_end, write_end = os.pipe()
        cfg = {"tmp": tmp, "limits": _limits(timeout, memory_mb), "disk_mb": int(disk_mb), "ppid": os.getpid(),
               "status_fd": write_end, "probe": probe}
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        start = time.monotonic()
        with open(os.path.join(tmp, "stdin"), "rb") as fin, open(out_path, "wb") as fout, \
                open(err_path, "wb") as ferr:
            proc = subprocess.Popen([python, "-I", "-S", str(RUNNER), json.dumps(cfg)], stdin=fin,
                                    stdout=fout, stderr=ferr, cwd=tmp, env=env, close_fds=True,
                                    pass_fds=(write_end,), start_new_session=True)
        os.close(write_end)
        write_end = -1
        status = ""
        try:
            exited = _wait(proc, timeout)
            if not exited:
                # the reaper first: the runner then reaps it and dies of the same signal, leaving no
                # orphan for a slow init to collect
                status = _read_status(read_end)
                _kill_reaper(status, 1.0)
                _wait(proc, 1.0)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the leader is at worst a zombie: its group id is ours
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            status += _read_status(read_end)
            _kill_reaper(status, 2.0)
            _drain_group(proc.pid)
        elapsed = time.monotonic() - start
        if proc.returncode == SETUP_FAILED and "ok\n" not in status:
            reason = next((line[7:] for line in status.splitlines() if line.startswith("error: ")), None)
            raise SandboxUnavailable(f"the code sandbox could not be set up on this host: "
                                     f"{reason or _read(err_path, 4096).strip()[-300:] or 'no reason given'}")
        result = RunResult(stdout=_read(out_path, OUTPUT_CAP_BYTES), stderr=_read(err_path, 64 * 1024)[-4096:],
                           returncode=proc.returncode, timed_out=not exited, elapsed=elapsed, pgid=proc.pid)
        return result, status
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def run_program(program: str, stdin: str = "", *, timeout: float = 5.0, memory_mb: int = 512,
                disk_mb: int = DISK_MB) -> RunResult:
    """Run the Python source `program` in the sandbox with `stdin`; see the module docstring.
    `timeout`: wall-clock seconds (CPU limit: timeout + 1); `memory_mb`: address-space limit;
    `disk_mb`: all files the program writes, together. Raises SandboxUnavailable where this host
    cannot give the sandbox its boundary."""
    require_sandbox()
    return _run(sandbox_report()["python"], program, stdin, timeout=timeout, memory_mb=memory_mb, disk_mb=disk_mb)[0]


def require_sandbox() -> None:
    """Raise SandboxUnavailable, saying why, unless this host gives the sandbox its whole boundary: for
    a stage to call before it starts scoring code, so it fails at once and not at the first program."""
    info = sandbox_report()
    if not info["ok"]:
        raise SandboxUnavailable(info["error"])


def normalize_output(text: str) -> str:
    """Lines with trailing whitespace removed, trailing blank lines dropped."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def run_tests(program: str, tests: Sequence[Mapping[str, str]], *, timeout: float = 5.0, memory_mb: int = 512,
              mode: Literal["all", "fraction"] = "all") -> float:
    """Score `program` on `tests`, each {"input": stdin, "output": expected stdout} (compared after
    `normalize_output`; a non-zero exit fails the test). mode="all" (default; R1's "pass the test
    cases"): 1.0 iff every test passes, stopping at the first failure; "fraction": the share passed.
    No tests, or any error, gives 0.0."""
    if mode not in ("all", "fraction"):
        raise ValueError(f"mode must be 'all' or 'fraction', not {mode!r}")
    if not isinstance(program, str) or not program.strip() or not tests:
        return 0.0
    passed = 0
    for test in tests:
        try:
            res = run_program(program, str(test.get("input", "")), timeout=timeout, memory_mb=memory_mb)
            ok = (res.returncode == 0 and not res.timed_out
                  and normalize_output(res.stdout) == normalize_output(str(test["output"])))
        except SandboxUnavailable:
            raise
        except Exception:  # noqa: BLE001
            ok = False
        if not ok and mode == "all":
            return 0.0
        passed += ok
    return passed / len(tests)


# possessive [ \t]*+: a fence followed by a run of spaces is not re-tried at every split of the run
# (quadratic: 64k characters of "```   " took 4.4 s)
_FENCE = re.compile(r"```[ \t]*+(?:python3?|py)?[ \t]*+\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(completion: str) -> str | None:
    """The program of a completion: the last ```python fenced block in the last <answer>, else that
    answer's text; without an <answer>, the last fenced block anywhere; else None."""
    if not isinstance(completion, str):
        return None
    tag = answer_tag(completion)
    region = tag.content if tag is not None else completion
    blocks = _FENCE.findall(region)
    if blocks:
        return blocks[-1]
    if tag is None:
        return None
    return region.strip() or None


def code_reward(completion: str, record: Mapping[str, Any]) -> float:
    """run_tests of the completion's program on record["tests"]; per-test limits from the record's
    optional "time_limit" (s, default 5) and "memory_mb" (default 512). 0.0 without tests or program;
    SandboxUnavailable where this host cannot sandbox (see `require_sandbox`)."""
    try:
        tests = record.get("tests")
        program = extract_program(completion)
        if not tests or program is None:
            return 0.0
        return run_tests(program, tests, timeout=float(record.get("time_limit", 5.0)),
                         memory_mb=int(record.get("memory_mb", 512)))
    except SandboxUnavailable:
        raise  # no score without the wall (see the module docstring)
    except Exception:  # noqa: BLE001
        return 0.0
