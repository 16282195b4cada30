"""The code sandbox's runner: `python -I -S sandbox_runner.py <json config>`, standard library only.

It builds the boundary the untrusted program runs inside, from the kernel, before the program's
first line, so that nothing the program can reach in its own interpreter matters:

    host (r1jax)                     new session, status pipe, stdin/stdout/stderr files
     └─ runner (this file)           unshare: user*, mount, PID, network, IPC, UTS namespaces
         └─ reaper (PID 1 of the new PID namespace)
              - a private mount tree: a read-only tmpfs root with read-only binds of /usr, /lib*
                and the interpreter's prefix, a minimal /dev, a new /proc, and the working
                directory (the host's sandbox path, mirrored) as a tmpfs of `disk_mb` (the total
                disk quota); pivot_root into it, the host's tree detached
              - waits for the program, then exits: the kernel kills whatever is left in the
                namespace (nothing outlives the reaper)
             └─ program (PID 2)     own session; as root: uid/gid nobody and then its own user
                                    namespace; no capabilities (bounding, ambient, securebits
                                    locked); rlimits; no-new-privileges; parent-death SIGKILL; a
                                    seccomp filter; then the audit hook and the program itself

(* as root the namespaces are made with root's own rights and the program enters a user namespace
of its own after dropping to nobody; otherwise the runner's user namespace maps only the caller's
uid.) The seccomp filter refuses, with EPERM: creating processes (clone without CLONE_THREAD, fork,
vfork; clone3 answers ENOSYS so threads fall back to clone), execve/execveat, namespaces (unshare,
setns, clone with namespace flags), mounts (old and new API), pivot_root/chroot, ptrace and
process_vm_*, bpf, perf_event_open, userfaultfd, io_uring, keyrings, modules, kexec, reboot, swap,
acct, handle-based opens, and sockets other than AF_UNIX. Other architectures than x86_64 and
aarch64 have no filter table: the sandbox refuses to start there.

Any setup step that fails is written to the status pipe as one line "error: <step>: <reason>" and
the runner exits 113; the host then refuses to score code rather than run with a weaker boundary.
The last thing written before the program starts is "ok": whatever the program prints cannot be
taken for a setup error. Both ends are described in `r1jax.rewards.code`.
"""

import ctypes
import errno
import json
import os
import platform
import resource
import signal
import struct
import sys

SETUP_FAILED = 113
NOBODY = 65534

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_THREAD = 0x10000000, 0x20000000, 0x40000000, 0x00010000
NAMESPACE_FLAGS = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 4, 24, 28, 38, 47
PR_SET_SECCOMP, SECCOMP_MODE_FILTER, PR_CAP_AMBIENT_CLEAR_ALL = 22, 2, 4
# noroot, no-setuid-fixup, keep-caps and no-ambient-raise, each with its lock
SECUREBITS_LOCKED = 0b11101111

# The syscalls the filter refuses, by name and number (x86_64: arch/x86/entry/syscalls/syscall_64.tbl;
# aarch64: include/uapi/asm-generic/unistd.h). aarch64 has no fork/vfork (glibc forks with clone).
_DENIED_X86_64 = """
    fork 57 vfork 58 execve 59 execveat 322 ptrace 101 process_vm_readv 310 process_vm_writev 311
    mount 165 umount2 166 pivot_root 155 chroot 161 unshare 272 setns 308 open_tree 428 move_mount 429
    fsopen 430 fsconfig 431 fsmount 432 fspick 433 mount_setattr 442 bpf 321 perf_event_open 298
    userfaultfd 323 io_uring_setup 425 io_uring_enter 426 io_uring_register 427 add_key 248 request_key 249
    keyctl 250 init_module 175 finit_module 313 delete_module 176 kexec_load 246 kexec_file_load 320
    reboot 169 swapon 167 swapoff 168 acct 163 name_to_handle_at 303 open_by_handle_at 304
"""
_DENIED_AARCH64 = """
    execve 221 execveat 281 ptrace 117 process_vm_readv 270 process_vm_writev 271
    mount 40 umount2 39 pivot_root 41 chroot 51 unshare 97 setns 268 open_tree 428 move_mount 429
    fsopen 430 fsconfig 431 fsmount 432 fspick 433 mount_setattr 442 bpf 280 perf_event_open 241
    userfaultfd 282 io_uring_setup 425 io_uring_enter 426 io_uring_register 427 add_key 217 request_key 218
    keyctl 219 init_module 105 finit_module 273 delete_module 106 kexec_load 104 kexec_file_load 294
    reboot 142 swapon 224 swapoff 225 acct 89 name_to_handle_at 264 open_by_handle_at 265
"""


def _table(text: str) -> dict[str, int]:
    words = text.split()
    return {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}


# per machine: the seccomp audit arch, pivot_root, the refused calls, and those checked by argument
ARCHES = {
    "x86_64": {"audit": 0xC000003E, "pivot_root": 155, "denied": _table(_DENIED_X86_64),
               "clone": 56, "clone3": 435, "socket": 41},
    "aarch64": {"audit": 0xC00000B7, "pivot_root": 41, "denied": _table(_DENIED_AARCH64),
                "clone": 220, "clone3": 435, "socket": 198},
}
AF_UNIX = 1


class SetupError(Exception):
    """A step of building the sandbox failed; the message names the step and the reason."""


libc = ctypes.CDLL(None, use_errno=True)


def _check(what: str, ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _mount(source, target, fstype, flags, data=None) -> None:
    _check(f"mount {target}", libc.mount(None if source is None else source.encode(), target.encode(),
                                         None if fstype is None else fstype.encode(), ctypes.c_ulong(flags),
                                         None if data is None else data.encode()))


def _bind_readonly(source: str, target: str) -> None:
    """A read-only bind of `source` at `target`, keeping the flags the source's mount locks (a user
    namespace may not clear nosuid/nodev/noexec/atime flags of a mount it did not make)."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, None, MS_BIND | MS_REC)
    st = os.statvfs(source).f_flag
    kept = ((MS_NOEXEC if st & os.ST_NOEXEC else 0) | (MS_NOATIME if st & os.ST_NOATIME else 0)
            | (MS_NODIRATIME if st & os.ST_NODIRATIME else 0) | (MS_RELATIME if st & 4096 else 0))
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | kept)


def _build_root(base: str, work: str, disk_mb: int, owner: int) -> None:
    """Mount the program's file system under `base` (see the module docstring) and pivot into it."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    _mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=4096,mode=0755")
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", *sorted(prefixes)):
        if os.path.islink(path):
            os.symlink(os.readlink(path), base + path)
        elif os.path.isdir(path) and not os.path.exists(base + path):
            _bind_readonly(path, base + path)
    for path in ("/etc/ld.so.cache", "/etc/localtime"):
        if os.path.isfile(path):
            _bind_readonly(path, base + path)
    os.mkdir(base + "/dev")
    _mount("tmpfs", base + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for dev in ("null", "zero", "random", "urandom"):
        open(f"{base}/dev/{dev}", "a").close()
        _mount(f"/dev/{dev}", f"{base}/dev/{dev}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{base}/dev/{name}")
    os.mkdir(base + "/proc")
    _mount("proc", base + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(base + work)
    _mount("tmpfs", base + work, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={int(disk_mb)}m,nr_inodes=4096,mode=0700")
    if owner != os.getuid():
        os.chown(base + work, owner, owner)
    os.chdir(base)
    arch = ARCHES[platform.machine()]
    _check("pivot_root", libc.syscall(arch["pivot_root"], b".", b"."))
    _check("detach the host's tree", libc.umount2(b".", MNT_DETACH))
    os.chdir("/")
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _map_self(uid: int, gid: int) -> None:
    """Map this process's own uid/gid into the user namespace it just made (and nothing else)."""
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write("/proc/self/gid_map", f"{gid} {gid} 1\n")


def _drop_capabilities() -> None:
    """No capabilities left, now or after any execve, in this user namespace."""
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == errno.EINVAL:  # past the last capability this kernel has
                break
            _check(f"drop capability {cap} from the bounding set", -1)
    _check("clear ambient capabilities", libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))
    _check("lock securebits", libc.prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED, 0, 0, 0))
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = bytes(24)  # effective, permitted, inheritable = 0, two 32-bit words each
    _check("capset", libc.capset(ctypes.c_char_p(header), ctypes.c_char_p(data)))


def seccomp_program(machine: str) -> list[tuple[int, int, int, int]]:
    """The classic-BPF seccomp filter (code, jt, jf, k) for `machine` (see the module docstring)."""
    if machine not in ARCHES:
        raise SetupError(f"seccomp: no syscall table for architecture {machine} (x86_64 and aarch64 only)")
    a = ARCHES[machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ/JGE/JSET|K, RET|K
    allow, kill, eperm, enosys = 0x7FFF0000, 0x80000000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, a["audit"]), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    if machine == "x86_64":
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, kill)]  # the x32 ABI
    for nr in sorted(set(a["denied"].values())):
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, a["clone3"]), (ret, 0, 0, enosys)]
    # clone: threads only (CLONE_THREAD set, no namespace flags); flags are the first argument
    prog += [(jeq, 0, 6, a["clone"]), (ld, 0, 0, 16), (jset, 0, 3, CLONE_THREAD), (jset, 1, 0, NAMESPACE_FLAGS),
             (ret, 0, 0, allow), (ret, 0, 0, eperm), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 3, a["socket"]), (ld, 0, 0, 16), (jeq, 1, 0, AF_UNIX), (ret, 0, 0, eperm)]
    prog += [(ret, 0, 0, allow)]
    return prog


def _install_seccomp() -> None:
    prog = seccomp_program(platform.machine())
    filters = b"".join(struct.pack("HBBI", *insn) for insn in prog)
    buf = ctypes.create_string_buffer(filters, len(filters))
    fprog = struct.pack("HxxxxxxP", len(prog), ctypes.addressof(buf))
    _check("seccomp filter", libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0))


def _install_audit_hook(root: str) -> None:
    """An early, friendly refusal of what a plain program has no business doing (PEP 578). Not the
    wall: the program can reach this hook's state; the namespaces and the filter above hold anyway."""
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


def _exit_like(status: int) -> None:
    """Exit with the waited-for child's status: the same code, or killed by the same signal (PID 1
    cannot signal itself: the reaper passes a signal on as 128 + its number, which the runner raises)."""
    if os.WIFSIGNALED(status):
        code = 128 + os.WTERMSIG(status)
    else:
        code = os.waitstatus_to_exitcode(status)
    if os.getpid() != 1 and 128 < code < 128 + signal.NSIG:
        if code - 128 not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(code - 128, signal.SIG_DFL)
        os.kill(os.getpid(), code - 128)
    os._exit(code)


def _wait_and_exit_like(pid: int) -> None:
    """Wait for the child `pid` (waitpid retries on EINTR itself) and exit as it did."""
    try:
        _, st = os.waitpid(pid, 0)
    except ChildProcessError:
        os._exit(1)
    _exit_like(st)


def _run_program(code) -> int:
    """Run the compiled program as `python prog.py` would; its exit status."""
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102  (what the sandbox is for)
        status = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:  # noqa: BLE001  (as the interpreter would: a traceback, status 1)
        import traceback

        traceback.print_exc()
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        status = status or 120
    return status


def _program(cfg: dict, status: int, src: bytes) -> None:
    """PID 2: become the unprivileged program and run it (never returns)."""
    root = os.getuid() == 0
    os.setsid()
    os.chdir(cfg["tmp"])
    if root:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        _check("unshare(CLONE_NEWUSER) as nobody", libc.unshare(CLONE_NEWUSER))
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # a uid change makes /proc/self root's; the maps need it ours
        _map_self(NOBODY, NOBODY)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    _drop_capabilities()
    for name, value in cfg["limits"].items():
        res = getattr(resource, name)
        hard = resource.getrlimit(res)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(res, (value, value))
    _check("no_new_privs", libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    _check("parent-death signal", libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))
    _install_seccomp()
    if cfg.get("probe"):
        import fractions  # noqa: F401  (the standard library, as the program)

        info = {"uid": os.getuid(), "pid": os.getpid()}
        for ns in ("net", "pid", "mnt", "user"):
            info[ns] = os.readlink(f"/proc/self/ns/{ns}")
        src = ("import json\nprint(json.dumps(" + repr(info) + "))").encode()
    os.write(status, b"ok\n")
    os.close(status)
    tmp = cfg["tmp"]
    del cfg
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"})
    for name in ("ctypes", "_ctypes"):
        sys.modules.pop(name, None)
    _install_audit_hook(tmp)
    sys.argv = ["prog.py"]
    os._exit(_run_program(compile(src, "prog.py", "exec")))


def _reaper(cfg: dict, status: int, src: bytes) -> None:
    """PID 1 of the new PID namespace: build the file system, start the program, wait, exit."""
    _check("parent-death signal", libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))
    owner = NOBODY if os.getuid() == 0 else os.getuid()
    os.umask(0o022)
    os.makedirs(os.path.join(cfg["tmp"], "root"), exist_ok=True)
    _build_root(os.path.join(cfg["tmp"], "root"), cfg["tmp"], cfg["disk_mb"], owner)
    pid = os.fork()
    if pid == 0:
        try:
            _program(cfg, status, src)
        except (SetupError, OSError) as e:
            os.write(status, f"error: {e}\n".encode())
        os._exit(SETUP_FAILED)
    os.close(status)
    _wait_and_exit_like(pid)  # and with PID 1 gone, the kernel kills anything left in the namespace


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status = cfg["status_fd"]
    try:
        _check("parent-death signal", libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))  # dies with the host
        with open(os.path.join(cfg["tmp"], "prog.py"), "rb") as f:
            src = f.read()
        if platform.machine() not in ARCHES:
            raise SetupError(f"seccomp: no syscall table for architecture {platform.machine()} "
                             f"(x86_64 and aarch64 only)")
        uid, gid = os.getuid(), os.getgid()
        flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
        if uid != 0:
            flags |= CLONE_NEWUSER
        _check("unshare(user, mount, PID, network, IPC, UTS namespaces)" + (
            "" if uid == 0 else " as a user (are unprivileged user namespaces off? kernel.unprivileged_userns_clone, "
                                "user.max_user_namespaces, kernel.apparmor_restrict_unprivileged_userns)"),
               libc.unshare(flags))
        if uid != 0:
            _map_self(uid, gid)
        if os.getppid() != cfg["ppid"]:
            os._exit(111)  # the host is gone already
        pid = os.fork()
    except (SetupError, OSError) as e:
        os.write(status, f"error: {e}\n".encode())
        os._exit(SETUP_FAILED)
    if pid == 0:
        try:
            _reaper(cfg, status, src)
        except (SetupError, OSError) as e:
            os.write(status, f"error: {e}\n".encode())
        os._exit(SETUP_FAILED)
    os.write(status, f"pid {pid}\n".encode())
    os.close(status)
    _wait_and_exit_like(pid)


if __name__ == "__main__":
    main()
