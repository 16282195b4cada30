"""The code sandbox's wall is the kernel: each attack here first switches the audit hook off from
inside the program (the bypass that defeated the old sandbox) and shows it is off, then tries to get
out. Every one scores 0, leaves no file outside the sandbox and no process behind."""

from __future__ import annotations

import os
import sqlite3  # noqa: F401  (the host has it: the sqlite attack is not failing for want of a module)
import struct
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from r1jax.rewards import code
from r1jax.rewards.code import (
    SandboxUnavailable,
    run_program,
    run_tests,
    sandbox_report,
)
from r1jax.rewards.sandbox_runner import ARCHES, CLONE_THREAD, seccomp_program

ESCAPED = [{"input": "", "output": "escaped"}]

# Switch the PEP 578 hook off through its closure cells (found with gc), then prove it: importing
# ctypes is one of the things the hook refuses.
BYPASS = textwrap.dedent("""
    import gc, sys
    for obj in gc.get_objects():
        if type(obj).__name__ == "function" and obj.__name__ == "hook" and obj.__closure__:
            for name, cell in zip(obj.__code__.co_freevars, obj.__closure__):
                if name == "denied":
                    cell.cell_contents = ("\\x00none",)
                elif name == "inside":
                    cell.cell_contents = lambda path: True
                elif name == "denied_modules":
                    cell.cell_contents = frozenset()
                elif name == "path_events":
                    cell.cell_contents = {}
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    print("HOOK-OFF", file=sys.stderr, flush=True)
""")


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """Sandbox directories under this test's tmp_path (so its processes are found by that path) and a
    world-writable host directory a sandboxed program would love to write into."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv(code.SCRATCH_ENV, str(scratch))
    target = tmp_path / "host"
    target.mkdir()
    os.chmod(target, 0o777)
    return scratch, target


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live (not zombie) processes whose command line contains `text`."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != "Z":
            out.append((int(name), state))
    return out


def assert_contained(program: str, scratch, target, *, timeout: float = 5.0, wait_after: float = 0.0):
    """The program (the bypass first) scores 0, saw the hook off, and left nothing behind."""
    before = set(os.listdir("/tmp"))
    res = run_program(BYPASS + program, timeout=timeout)
    assert "HOOK-OFF" in res.stderr, res.stderr  # the bypass did switch the hook off
    assert "escaped" not in res.stdout, (res.stdout, res.stderr)
    assert run_tests(BYPASS + program, ESCAPED, timeout=timeout) == 0.0
    time.sleep(wait_after)  # an orphan would have done its work by now
    assert processes_mentioning(str(scratch)) == []
    assert os.listdir(target) == []
    assert os.listdir(scratch) == []  # the sandbox directories are gone too
    assert {n for n in set(os.listdir("/tmp")) - before if not n.startswith(("pytest", "tmp"))} == set()
    return res


def test_bypass_then_write_outside(scratch):
    _, target = scratch
    for path in (str(target / "pwned"), f"/tmp/pwned-{uuid.uuid4().hex}", "/pwned", "/usr/pwned"):
        program = f"open({path!r}, 'w').write('x')\nprint('escaped')"
        res = assert_contained(program, *scratch)
        assert "Error" in res.stderr
        assert not os.path.exists(path)


def test_bypass_then_ctypes(scratch):
    _, target = scratch
    host = str(target / "via-libc")
    program = textwrap.dedent(f"""
        import os
        tries = {{
            "open": libc.open({host.encode()!r}, os.O_WRONLY | os.O_CREAT, 0o666),
            "unshare": libc.unshare(0x10000000 | 0x00020000),          # a user + mount namespace
            "mount": libc.mount(b"none", b"/tmp", b"tmpfs", 0, None),
            "chroot": libc.chroot(b"/"),
            "ptrace": libc.ptrace(16, 1, 0, 0),                         # PTRACE_ATTACH to the reaper
            "setuid": libc.setuid(0),
        }}
        print(tries, file=__import__("sys").stderr)
        if any(v >= 0 for v in tries.values()):
            print("escaped")
    """)
    res = assert_contained(program, *scratch)
    assert "'unshare': -1" in res.stderr and "'mount': -1" in res.stderr, res.stderr


def test_bypass_then_exec(scratch):
    for program in ("import subprocess\nsubprocess.run(['id'], check=True)\nprint('escaped')",
                    "import os\nos.execv('/usr/bin/env', ['env', 'echo', 'escaped'])",
                    "import os\nos.system('echo escaped')",
                    "import os\nos.posix_spawn('/bin/echo', ['echo', 'escaped'], {})\nimport time\ntime.sleep(1)"):
        assert_contained(program, *scratch)


def test_bypass_then_orphan(scratch):
    """A double-forked, setsid child that outlives the program and writes a file later: it is never
    born (no new processes), and a thread cannot outlive the process."""
    _, target = scratch
    late = str(target / "late")
    program = textwrap.dedent(f"""
        import os, threading, time
        def later():
            time.sleep(1.5)
            open({late!r}, "w").write("x")
        try:
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    later()
                os._exit(0)
            print("escaped")
        except OSError as e:
            print("fork:", e, file=__import__("sys").stderr)
        threading.Thread(target=later).start()
    """)
    res = assert_contained(program, *scratch, wait_after=2.0)
    assert "fork: [Errno 1]" in res.stderr, res.stderr  # refused by the kernel, not the (switched off) hook
    assert not os.path.exists(late)


@pytest.mark.parametrize("attack", [
    "import os\nos.mkfifo({path!r})",
    "import os, stat\nos.mknod({path!r}, 0o600 | stat.S_IFREG)",
    "import sqlite3\nsqlite3.connect({path!r}).execute('create table t (x)')",
    "import dbm\ndbm.open({path!r}, 'c')['k'] = 'v'",
], ids=["mkfifo", "mknod", "sqlite", "dbm"])
def test_files_outside_without_the_hooks_help(attack, scratch):
    """mkfifo, mknod, sqlite and dbm are not audit events: the read-only root refuses them outside
    the working directory, where they work."""
    scratch_dir, target = scratch
    for path in (str(target / "f"), f"/tmp/f-{uuid.uuid4().hex}"):
        program = attack.format(path=path) + "\nprint('escaped')"
        assert run_tests(program, ESCAPED) == 0.0
        assert not os.path.exists(path) and not any(p.startswith(os.path.basename(path)) for p in os.listdir(
            os.path.dirname(path)))
    assert run_tests(attack.format(path="inside") + "\nprint('escaped')", ESCAPED) == 1.0  # the same, inside
    assert processes_mentioning(str(scratch_dir)) == [] and os.listdir(scratch_dir) == []


def test_total_disk_quota(scratch):
    """Ten 16 MB files: the working directory holds 64 MB in all, so the fifth fails; nothing reaches
    the host's disk."""
    scratch_dir, _ = scratch
    program = textwrap.dedent("""
        block = b"x" * (1 << 20)
        for i in range(10):
            with open(f"f{i}", "wb") as f:
                for _ in range(16):
                    f.write(block)
            print(i, flush=True)
        print("escaped")
    """)
    res = run_program(program, timeout=10.0)
    assert res.returncode != 0 and "escaped" not in res.stdout
    written = [int(x) for x in res.stdout.split()]
    assert written == [0, 1, 2, 3], (res.stdout, res.stderr)  # 4 x 16 MB = the 64 MB quota
    assert "No space left on device" in res.stderr
    assert run_tests(program, ESCAPED, timeout=10.0) == 0.0
    assert os.listdir(scratch_dir) == []


def test_the_kernel_layers_seen_from_inside(scratch):
    """With the hook switched off: no capabilities, no-new-privs, a seccomp filter, a PID namespace with
    only the reaper and the program, no network interface but lo, a read-only root, uid nobody as root."""
    program = BYPASS + textwrap.dedent("""
        import os
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
        print({k: status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")})
        print(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
        print([line.split(":")[0].strip() for line in open("/proc/net/dev").read().splitlines()[2:]])
        try:
            open("/etc/x", "w")
        except OSError as e:
            print(e.errno)
        print(os.getuid(), os.getcwd() == os.environ["HOME"])
    """)
    res = run_program(program, timeout=5.0)
    assert res.returncode == 0, res.stderr
    caps, pids, interfaces, errno_, ids = res.stdout.splitlines()
    assert eval(caps) == {"CapEff": "0" * 16, "CapPrm": "0" * 16, "CapBnd": "0" * 16, "CapAmb": "0" * 16,
                          "NoNewPrivs": "1", "Seccomp": "2"}
    assert eval(pids) == [1, 2]
    assert eval(interfaces) == ["lo"]
    assert int(errno_) == 30  # EROFS
    uid, home = ids.split()
    assert home == "True"
    if os.getuid() == 0:
        assert int(uid) == 65534


def test_a_program_cannot_fake_a_setup_failure(scratch):
    """The runner's setup errors travel on a pipe closed before the program starts: a program that
    prints one and exits with the runner's code just fails its test."""
    res = run_program(f"print('error: unshare: no'); import sys; sys.exit({code.SETUP_FAILED})")
    assert res.returncode == code.SETUP_FAILED
    assert run_tests(f"print('escaped'); import sys; sys.exit({code.SETUP_FAILED})", ESCAPED) == 0.0


def test_a_host_that_cannot_build_the_sandbox_refuses(scratch, monkeypatch):
    """A setup step that fails (here: a tmpfs of an impossible size) is reported, with the step, as
    SandboxUnavailable, and code rewards refuse rather than score without the wall."""
    with pytest.raises(SandboxUnavailable, match="mount"):
        code._run(sys.executable, "print(1)", "", timeout=5.0, memory_mb=256, disk_mb=-1)
    monkeypatch.setattr(code, "_setup", dict(sandbox_report(), ok=False, error="no user namespaces here"))
    with pytest.raises(SandboxUnavailable, match="no user namespaces here"):
        run_tests("print('escaped')", ESCAPED)
    with pytest.raises(SandboxUnavailable, match="no user namespaces here"):
        code.code_reward("<answer>```python\nprint('escaped')\n```</answer>", {"tests": ESCAPED})


# --------------------------------------------------------------------------------------------------
# The seccomp filter, run by a plain classic-BPF interpreter written here
# --------------------------------------------------------------------------------------------------

def run_bpf(prog, nr: int, arch: int, args=(0,) * 6) -> int:
    data = struct.pack("<iI Q 6Q", nr, arch, 0, *args)
    acc, pc = 0, 0
    while True:
        op, jt, jf, k = prog[pc]
        if op == 0x20:  # ld [k]
            acc = struct.unpack_from("<I", data, k)[0]
        elif op == 0x06:  # ret k
            return k
        elif op in (0x15, 0x35, 0x45):  # jeq, jge, jset
            taken = acc == k if op == 0x15 else acc >= k if op == 0x35 else bool(acc & k)
            pc += jt if taken else jf
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")
        pc += 1


@pytest.mark.parametrize("machine", sorted(ARCHES))
def test_seccomp_filter_decisions(machine):
    prog = seccomp_program(machine)
    a = ARCHES[machine]
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38
    for name, nr in a["denied"].items():
        assert run_bpf(prog, nr, a["audit"]) == eperm, name
    assert run_bpf(prog, a["clone3"], a["audit"]) == enosys
    thread = 0x3D0F00  # glibc's pthread_create flags: CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|...
    assert thread & CLONE_THREAD
    assert run_bpf(prog, a["clone"], a["audit"], (thread, 0, 0, 0, 0, 0)) == allow
    assert run_bpf(prog, a["clone"], a["audit"], (0x01200011, 0, 0, 0, 0, 0)) == eperm  # glibc's fork
    assert run_bpf(prog, a["clone"], a["audit"], (thread | 0x10000000, 0, 0, 0, 0, 0)) == eperm  # + NEWUSER
    assert run_bpf(prog, a["socket"], a["audit"], (1, 1, 0, 0, 0, 0)) == allow  # AF_UNIX
    assert run_bpf(prog, a["socket"], a["audit"], (2, 1, 0, 0, 0, 0)) == eperm  # AF_INET
    assert run_bpf(prog, a["socket"], a["audit"], (16, 3, 0, 0, 0, 0)) == eperm  # AF_NETLINK
    for nr in (0, 1, 3, 9, 60, 63, 64, 231):  # ordinary calls (read/write/close/mmap/exit... on either table)
        if nr not in a["denied"].values() and nr not in (a["clone"], a["clone3"], a["socket"]):
            assert run_bpf(prog, nr, a["audit"]) == allow, nr
    other = next(v["audit"] for m, v in ARCHES.items() if m != machine)
    assert run_bpf(prog, 0, other) == kill  # a syscall from another ABI
    if machine == "x86_64":
        assert run_bpf(prog, 0x40000000 + 1, a["audit"]) == kill  # x32


def test_the_runner_runs_with_the_standard_library_only():
    """`python -I -S`: the runner imports nothing from r1jax or site-packages."""
    probe = (f"import runpy, sys; sys.argv = ['x']; runpy.run_path({str(code.RUNNER)!r}, run_name='not_main'); "
             f"print(sorted(m for m in sys.modules if m.startswith('r1jax')))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, timeout=30,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_reward_workers_refuse_code_where_the_host_cannot_sandbox(monkeypatch):
    """A worker process that cannot sandbox does not score the code 0 and go on: the caller gets
    SandboxUnavailable with the reason, through the worker pool as inline."""
    from r1jax.rewards import RewardFn

    monkeypatch.setenv(code.DISABLED_ENV, "1")
    monkeypatch.setattr(code, "_setup", None)  # probe again, here as in the workers
    completion = "<think> t </think> <answer>```python\nprint('escaped')\n```</answer>"
    with pytest.raises(SandboxUnavailable, match=code.DISABLED_ENV):
        RewardFn({"accuracy": 1.0}, inline=True)([completion], [{"tests": ESCAPED}])
    with RewardFn({"accuracy": 1.0}, workers=1, timeout=20.0) as fn:
        assert fn(["<answer> 2 </answer>"], [{"answer": "2"}])["accuracy"][0] == 1.0  # no code: scored as ever
        with pytest.raises(SandboxUnavailable, match=code.DISABLED_ENV):
            fn([completion], [{"tests": ESCAPED}])
