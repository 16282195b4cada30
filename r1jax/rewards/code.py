"""Code reward (R1 section 2.2.2: "for LeetCode problems, a compiler can be used to generate feedback
based on predefined test cases"): run the generated program on each test's stdin in a sandbox and
compare its stdout with the expected one.

One fresh process per test case: `python -I -S` in a new session (process group) and an empty
temporary directory (cwd, HOME, TMPDIR), minimal environment, stdin/stdout through files. Before the
program runs, a small runner inside that process applies, in order:

1. a new network namespace (`unshare(CLONE_NEWNET)`; as non-root with `CLONE_NEWUSER` too): no
   interface but a down loopback, so no connection can leave;
2. resource limits, soft = hard: address space (memory_mb), CPU seconds (timeout + 1), processes,
   file size (16 MB, so also the captured stdout), open files (64), no core dumps;
3. as root: uid/gid `nobody` and no supplementary groups, so file permissions protect the host
   (needs an interpreter that `nobody` can read, see `sandbox_report`); then no-new-privileges and a
   parent-death SIGKILL, so the program dies with the process that started it;
4. an audit hook (PEP 578; the program cannot remove it) that refuses sockets, fork/exec/spawn/
   subprocess, signals to other processes, ctypes, changing rlimits, links, and any write, delete,
   rename or chmod outside the temporary directory.

The parent waits on a wall-clock limit and then SIGKILLs the whole process group, done or not. The
runner does this setup itself rather than in a `preexec_fn`, which is unsafe when the parent has
threads (JAX has many). Whatever fails (timeout, crash, non-zero exit, wrong output) scores 0 for that
test. Layers 1 and 3 depend on the host (see `sandbox_report`); 2 and 4 always apply. The audit hook
is a guard against ordinary programs (and reward hacking by plain Python), not a security boundary
against native code: a program may still write a shared library into its directory and load it.
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
from typing import Any, Literal

from r1jax.rewards.answer import answer_tag

OUTPUT_CAP_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE: also bounds the captured stdout
MAX_PROCESSES = 32  # RLIMIT_NPROC headroom above what the sandbox uid already runs
NOBODY = 65534
SCRATCH_ENV = "R1JAX_SANDBOX_DIR"  # where sandbox directories go (default: the system temp dir)

# Runs as `python -I -S -c _RUNNER <json config>` in the sandbox directory. Standard library only.
_RUNNER = r'''
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
tmp = cfg["tmp"]
with open(os.path.join(tmp, "prog.py"), "rb") as f:
    src = f.read()
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare, libc.prctl
except (ImportError, OSError, AttributeError):                          # not glibc/Linux: no netns
    libc = None
netns = libc is not None and libc.unshare(0x40000000) == 0              # CLONE_NEWNET
if libc is not None and not netns and os.getuid() != 0:
    netns = libc.unshare(0x10000000 | 0x40000000) == 0                  # CLONE_NEWUSER | CLONE_NEWNET
for name, value in cfg["limits"].items():
    res = getattr(resource, name)
    hard = resource.getrlimit(res)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(res, (value, value))
if cfg["drop"] and os.getuid() == 0:
    os.chown(tmp, 65534, 65534)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
if libc is not None:
    libc.prctl(38, 1, 0, 0, 0)                                          # PR_SET_NO_NEW_PRIVS
    libc.prctl(1, 9, 0, 0, 0)                                           # PR_SET_PDEATHSIG, SIGKILL
if os.getppid() != cfg["ppid"]:
    os._exit(111)
if cfg.get("probe"):
    try:
        import fractions, heapq, math, threading                        # the standard library, after the drop
        stdlib = True
    except ImportError:
        stdlib = False
    print(json.dumps({"netns": netns, "uid": os.getuid(), "stdlib": stdlib}))
    sys.stdout.flush()
    os._exit(0)
del libc
for name in ("ctypes", "_ctypes"):
    sys.modules.pop(name, None)

def _install(tmp, os=os, sys=sys):
    root = os.path.realpath(tmp)
    realpath, fsdecode, isdir = os.path.realpath, os.fsdecode, os.path.isdir
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    denied = ("socket.", "ctypes.", "os.fork", "os.exec", "os.spawn", "os.posix_spawn", "os.system",
              "subprocess.", "pty.", "os.kill", "signal.pthread_kill", "resource.setrlimit",
              "resource.prlimit", "os.symlink", "os.link", "os.setns", "os.unshare", "sys.remote_exec")
    path_events = {"os.remove": 1, "os.rmdir": 1, "os.rename": 2, "os.mkdir": 1, "os.chmod": 1,
                   "os.chown": 1, "os.truncate": 1, "os.utime": 1, "os.chflags": 1, "os.lchflags": 1,
                   "os.setxattr": 1, "os.removexattr": 1}
    denied_modules = frozenset(("ctypes", "_ctypes", "_posixsubprocess"))

    def inside(path):
        p = realpath(fsdecode(path))
        return p == root or p.startswith(root + "/")

    def hook(event, args):
        if event.startswith(denied):
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            writes = (mode is not None and any(c in mode for c in "wax+")) or bool(flags & write_flags)
            if (writes or (mode is None and isdir(fsdecode(path)))) and not inside(path):
                raise PermissionError("sandbox: no writing (or directory handles) outside the working directory")
        elif event in path_events:
            for path in args[:path_events[event]]:
                fd_ok = event == "os.truncate"  # ftruncate of a descriptor opened for writing
                if not fd_ok if isinstance(path, int) else not inside(path):
                    raise PermissionError("sandbox: " + event + " outside the working directory")
        elif event == "import" and args[0] in denied_modules:
            raise PermissionError("sandbox: import " + args[0] + " is not allowed")

    sys.addaudithook(hook)

_install(tmp)
del _install
sys.argv = ["prog.py"]
code = compile(src, "prog.py", "exec")
del cfg, src, tmp
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
'''


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
# Host capabilities: which interpreter, and whether uid nobody works
# --------------------------------------------------------------------------------------------------

_setup_lock = threading.Lock()
_setup: dict[str, Any] | None = None


def _candidates() -> list[str]:
    minor = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    out = [sys.executable]
    for path in (f"/usr/bin/{minor}", f"/usr/local/bin/{minor}", shutil.which(minor)):
        if path and os.path.exists(path) and path not in out:
            out.append(path)
    return out


def _probe(python: str, drop: bool) -> dict | None:
    try:
        res = _run(python, drop, "", "", timeout=10.0, memory_mb=512, probe=True)
        return json.loads(res.stdout) if res.returncode == 0 else None
    except (OSError, ValueError):
        return None


def sandbox_report() -> dict[str, Any]:
    """Which isolation this host gives, probed once per process by running the sandbox:
    {"python": interpreter, "uid": the program's uid, "drop_uid": runs as nobody, "netns": has its own
    network namespace, "root": the caller is root}. As root, the first interpreter (sys.executable,
    then the system python of the same version) that works as uid nobody is used; if none does, the
    program stays root and only the audit hook guards the file system."""
    global _setup
    with _setup_lock:
        if _setup is None:
            root = os.getuid() == 0
            chosen = None
            if root:
                for python in _candidates():
                    info = _probe(python, drop=True)
                    if info is not None and info["uid"] == NOBODY and info["stdlib"]:
                        chosen = {"python": python, "drop_uid": True, **info}
                        break
            if chosen is None:
                info = _probe(sys.executable, drop=False) or {"netns": False, "uid": os.getuid(), "stdlib": False}
                chosen = {"python": sys.executable, "drop_uid": False, **info}
            chosen["root"] = root
            _setup = chosen
        return dict(_setup)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------

def _limits(timeout: float, memory_mb: int, drop: bool) -> dict[str, int]:
    uid = NOBODY if drop else os.getuid()
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


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to `timeout` s for `proc` to exit without reaping it (so its pid keeps naming the process
    group until we kill the group). True if it exited."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            poller = select.poll()  # not select.select: fds above 1023 are common next to JAX
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(max(timeout, 0.0) * 1000))
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


def _run(python: str, drop: bool, program: str, stdin: str, *, timeout: float, memory_mb: int,
         probe: bool = False) -> RunResult:
    tmp = tempfile.mkdtemp(prefix="r1jax-sandbox-", dir=os.environ.get(SCRATCH_ENV) or None)
    try:
        os.chmod(tmp, 0o700)
        with open(os.path.join(tmp, "prog.py"), "w", encoding="utf-8") as f:
            f.write(program)
        with open(os.path.join(tmp, "stdin"), "w", encoding="utf-8") as f:
            f.write(stdin)
        cfg = {"tmp": tmp, "limits": _limits(timeout, memory_mb, drop), "drop": drop, "ppid": os.getpid(),
               "probe": probe}
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        start = time.monotonic()
        with open(os.path.join(tmp, "stdin"), "rb") as fin, open(out_path, "wb") as fout, \
                open(err_path, "wb") as ferr:
            proc = subprocess.Popen([python, "-I", "-S", "-c", _RUNNER, json.dumps(cfg)], stdin=fin,
                                    stdout=fout, stderr=ferr, cwd=tmp, env=env, close_fds=True,
                                    start_new_session=True)
        try:
            exited = _wait(proc, timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the leader is at worst a zombie: its group id is ours
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            _drain_group(proc.pid)
        elapsed = time.monotonic() - start
        return RunResult(stdout=_read(out_path, OUTPUT_CAP_BYTES), stderr=_read(err_path, 64 * 1024)[-4096:],
                         returncode=proc.returncode, timed_out=not exited, elapsed=elapsed, pgid=proc.pid)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_program(program: str, stdin: str = "", *, timeout: float = 5.0, memory_mb: int = 512) -> RunResult:
    """Run the Python source `program` in the sandbox with `stdin`; see the module docstring.
    `timeout`: wall-clock seconds (CPU limit: timeout + 1); `memory_mb`: address-space limit."""
    info = sandbox_report()
    return _run(info["python"], info["drop_uid"], program, stdin, timeout=timeout, memory_mb=memory_mb)


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
        except Exception:  # noqa: BLE001
            ok = False
        if not ok and mode == "all":
            return 0.0
        passed += ok
    return passed / len(tests)


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


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
    optional "time_limit" (s, default 5) and "memory_mb" (default 512). 0.0 without tests or program."""
    try:
        tests = record.get("tests")
        program = extract_program(completion)
        if not tests or program is None:
            return 0.0
        return run_tests(program, tests, timeout=float(record.get("time_limit", 5.0)),
                         memory_mb=int(record.get("memory_mb", 512)))
    except Exception:  # noqa: BLE001
        return 0.0
