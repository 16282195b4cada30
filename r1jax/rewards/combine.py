"""The weighted rule-based reward the GRPO driver calls: `RewardFn(weights)(completions, records)`.

Scoring runs in worker processes that talk to the caller over pipes, so a completion whose scoring
hangs (sympy on a pathological expression, a program that sleeps) costs at most `timeout` seconds:
its worker is killed, replaced, and the completion scores 0 on every component. Each worker caps its
own address space (RLIMIT_AS, `memory_mb`, set by the worker itself as it starts), so an allocation
past it fails inside that worker (the verifier's MemoryError scores 0; a worker that dies of it is
replaced) instead of taking the host's memory. Completions longer than `max_chars` score 0 without
being parsed. Workers are plain `python -c` subprocesses (not fork: the caller has JAX threads; not
multiprocessing's spawn either, which would re-import the caller's `__main__` and with it JAX) that
import only r1jax.rewards. `RewardFn.stats()` counts timeouts, crashes, worker restarts, refused
expressions (`accuracy.explodes`) and over-long completions, and the highest worker peak RSS.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import r1jax.rewards.accuracy
from r1jax.rewards.accuracy import accuracy_reward, is_code_record, refusals
from r1jax.rewards.code import SCRATCH_ENV, SandboxUnavailable, code_reward
from r1jax.rewards.format import format_reward
from r1jax.rewards.language import LANGUAGE_PREDICATES, language_consistency

COMPONENTS = ("accuracy", "format", "language", "code")
WORKER_START_TIMEOUT_S = 120.0
MEMORY_MB = 2048  # address-space cap of a reward worker (RLIMIT_AS)
MAX_COMPLETION_CHARS = 262_144  # a longer completion scores 0 on every component, unparsed (64k tokens at ~4 chars)
SEND_TRIES = 2  # a completion whose worker died as it was sent goes to a fresh one once, then scores 0


def reward_weights(weights: Any) -> dict[str, float]:
    """{component: weight} from a Mapping, a dataclass (e.g. config.RewardWeights) or any object with
    component-named attributes. ValueError naming an unknown component."""
    if dataclasses.is_dataclass(weights) and not isinstance(weights, type):
        raw = dataclasses.asdict(weights)
    elif isinstance(weights, Mapping):
        raw = dict(weights)
    else:
        raw = {name: getattr(weights, name) for name in COMPONENTS if hasattr(weights, name)}
    unknown = sorted(str(k) for k in raw if k not in COMPONENTS)
    if unknown:
        raise ValueError(f"unknown reward component(s) {', '.join(unknown)}; known: {', '.join(COMPONENTS)}")
    return {name: float(value) for name, value in raw.items()}


def oversized(completion: Any, max_chars: int | None) -> bool:
    """A completion too long to score: a str of more than max_chars characters (None or 0: no limit)."""
    return bool(max_chars) and isinstance(completion, str) and len(completion) > max_chars


def score_components(completion: str, record: Mapping[str, Any], components: Sequence[str],
                     target_language: str = "en", template: str = "r1_zero",
                     max_chars: int | None = MAX_COMPLETION_CHARS) -> dict[str, float]:
    """{component: score in [0, 1]} for one completion. "code" is the sandboxed test result for a
    record with "tests" (0.0 for any other record); "accuracy" of such a record is that same result
    (run once). A component that raises scores 0.0; a completion longer than max_chars characters
    scores 0.0 on every component without being read."""
    if oversized(completion, max_chars):
        return {name: 0.0 for name in components}
    out: dict[str, float] = {}
    code: list[float] = []

    def code_score() -> float:
        if not code:
            code.append(code_reward(completion, record) if is_code_record(record) else 0.0)
        return code[0]

    for name in components:
        try:
            if name == "accuracy":
                value = code_score() if is_code_record(record) else accuracy_reward(completion, record)
            elif name == "format":
                value = format_reward(completion, template)
            elif name == "language":
                value = language_consistency(completion, target_language)
            elif name == "code":
                value = code_score()
            else:
                raise ValueError(f"unknown reward component {name!r}")
            out[name] = min(max(float(value), 0.0), 1.0)
        except SandboxUnavailable:
            raise  # no code score without the sandbox's wall: the caller stops, saying why
        except Exception:  # noqa: BLE001
            out[name] = 0.0
    return out


# --------------------------------------------------------------------------------------------------
# Worker processes: length-prefixed pickles over stdin/stdout
# --------------------------------------------------------------------------------------------------

_HEADER = struct.Struct(">I")


def _send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[stream.write(view):]  # unbuffered: a write may be partial


def _read_exact(stream, n: int) -> bytes:
    chunks = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            raise EOFError("reward worker pipe closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv(stream):
    (size,) = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    return pickle.loads(_read_exact(stream, size))


def _die_with_parent() -> None:
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _limit_address_space(memory_mb: int) -> None:
    """RLIMIT_AS of this process to memory_mb MiB (soft = hard; never above an existing hard limit)."""
    import resource

    limit = int(memory_mb) * 1024 * 1024
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """A process's peak resident set (VmHWM of /proc/<pid>/status) in MiB; None if unreadable.
    Not getrusage's ru_maxrss: a spawned process inherits its parent's in that one."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def worker_main(components: Sequence[str], target_language: str, template: str = "r1_zero",
                memory_mb: int = MEMORY_MB, max_chars: int | None = MAX_COMPLETION_CHARS,
                precheck: bool = True) -> None:
    """Loop of a worker process: (index, completion, record) in, (index, scores, {"refused", "peak_rss_mb"})
    out. Caps its own address space first (memory_mb; 0: no cap)."""
    _die_with_parent()
    if memory_mb:
        _limit_address_space(memory_mb)
    r1jax.rewards.accuracy.PRECHECK = precheck
    inp = os.fdopen(os.dup(0), "rb", buffering=0)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints must not corrupt the protocol
    score_components(" <think> w </think> <answer> \\frac{1}{2} </answer>", {"answer": "0.5"}, components,
                     target_language)  # warm the imports before saying ready
    _send(out, "ready")
    while True:
        try:
            index, completion, record = _recv(inp)
        except EOFError:
            return
        before = refusals()
        try:
            scores = score_components(completion, record, components, target_language, template, max_chars)
        except SandboxUnavailable as e:
            _send(out, (index, None, {"unavailable": str(e)}))
            continue
        _send(out, (index, scores, {"refused": refusals() - before, "peak_rss_mb": peak_rss_mb()}))


class _Worker:
    def __init__(self, components: Sequence[str], target_language: str, template: str, memory_mb: int,
                 max_chars: int | None, precheck: bool):
        # Its sandbox directories go here, so that killing a hung worker leaves none behind. Others may
        # traverse (the sandbox may run as nobody) but not list it.
        self.scratch = tempfile.mkdtemp(prefix="r1jax-reward-worker-")
        os.chmod(self.scratch, 0o711)
        env = dict(os.environ)
        env[SCRATCH_ENV] = self.scratch
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = "1"  # one thread: no per-core BLAS buffers in the capped address space
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        boot = ("from r1jax.rewards.combine import worker_main; "
                f"worker_main({tuple(components)!r}, {target_language!r}, {template!r}, {int(memory_mb)!r}, "
                f"{max_chars!r}, {bool(precheck)!r})")
        self.proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0, env=env, start_new_session=True)
        self.started = time.monotonic()
        self.ready = False
        self.job: tuple[int, float] | None = None  # (item index, deadline)
        self.sent = 0.0  # when the job was sent

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        shutil.rmtree(self.scratch, ignore_errors=True)

    def hang_up(self) -> None:
        try:
            self.proc.stdin.close()  # EOF: the worker returns
        except OSError:
            pass

    def close(self, grace: float = 1.0) -> None:
        self.hang_up()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


STAT_KEYS = ("completions", "timeouts", "crashes", "restarts", "refusals", "oversized")  # RewardFn.stats() counts
STAT_MAXIMA = ("worker_peak_rss_mb", "slowest_seconds")  # and its maxima


def stats_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """What happened between two `RewardFn.stats()`: the counts subtracted, the maxima (STAT_MAXIMA)
    as `after` has them."""
    return {k: v if k in STAT_MAXIMA else v - before.get(k, 0) for k, v in after.items()}


class RewardFn:
    """`fn(completions, records) -> {component: float32[N], ..., "total": float32[N]}`.

    weights: {component: weight} (a Mapping, config.RewardWeights or an object with those attributes)
        over COMPONENTS = accuracy (R1 section 2.2.2: right final answer; code records: all tests pass),
        format (section 2.2.2: <think>/<answer> layout), language (section 2.3.2: share of
        target-language words in the CoT), code (the sandboxed tests alone; 0 for non-code records).
        Components with weight 0 are not computed or returned; "total" is the weighted sum.
    timeout: seconds one completion may take in a worker; past it every component scores 0, the
        worker is killed and replaced.
    workers: worker processes (0: min(4, cpu count)), started on the first call and kept.
    template: the chat template the completions follow (the format reward's layout).
    memory_mb: each worker's address-space cap (RLIMIT_AS, MiB; 0: none). Past it an allocation fails
        in the worker: the completion scores 0 (and a worker that dies of it is replaced).
    max_chars: a longer completion scores 0 on every component and is not sent to a worker (0: no limit).
    precheck: refuse exploding expressions before the verifier (`accuracy.explodes`); False only to
        test the memory cap.
    inline: score in the calling process instead (no timeout, no memory cap; for unit tests and
        debugging; max_chars and the pre-check still apply).

    `stats()`: what happened so far (STAT_KEYS: completions (all that were passed), timeouts, crashes
    (a worker died while scoring), worker restarts, refusals (expressions refused by the pre-check),
    oversized completions), plus the maxima "worker_peak_rss_mb" (the highest peak RSS of any worker, as it
    reported it or as read before killing it) and "slowest_seconds" (the longest a completion took
    in a worker, from sending it to its answer or its kill).
    """

    def __init__(self, weights: Any, *, timeout: float = 10.0, workers: int = 0, target_language: str = "en",
                 template: str = "r1_zero", memory_mb: int = MEMORY_MB, max_chars: int = MAX_COMPLETION_CHARS,
                 precheck: bool = True, inline: bool = False):
        if target_language not in LANGUAGE_PREDICATES:
            raise ValueError(f"unknown target language {target_language!r}; known: {', '.join(LANGUAGE_PREDICATES)}")
        if memory_mb < 0 or max_chars < 0:
            raise ValueError(f"memory_mb and max_chars must be >= 0 (0: no limit), got {memory_mb}, {max_chars}")
        self.weights = {k: w for k, w in reward_weights(weights).items() if w != 0.0}
        self.components = tuple(name for name in COMPONENTS if name in self.weights)
        self.timeout = float(timeout)
        self.num_workers = workers if workers > 0 else min(4, os.cpu_count() or 1)
        self.target_language = target_language
        self.template = template
        self.memory_mb, self.max_chars, self.precheck = int(memory_mb), int(max_chars), bool(precheck)
        self.inline = inline
        self._workers: list[_Worker] = []
        self._stats = dict.fromkeys(STAT_KEYS, 0)
        self._peak_rss_mb = self._slowest = 0.0

    def __call__(self, completions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        if len(completions) != len(records):
            raise ValueError(f"{len(completions)} completions but {len(records)} records")
        self._stats["oversized"] += sum(oversized(c, self.max_chars) for c in completions)
        if self.inline or not self.components:
            before = refusals()
            rows = [score_components(c, r, self.components, self.target_language, self.template, self.max_chars)
                    for c, r in zip(completions, records, strict=True)]
            self._stats["refusals"] += refusals() - before
        else:
            rows = self._score_in_workers(list(completions), list(records))
        self._stats["completions"] += len(rows)
        out = {name: np.asarray([(row or {}).get(name, 0.0) for row in rows], np.float32) for name in self.components}
        total = np.zeros(len(rows), np.float32)
        for name in self.components:
            total += np.float32(self.weights[name]) * out[name]
        out["total"] = total
        return out

    def stats(self) -> dict[str, float]:
        """Counts since this RewardFn was made (STAT_KEYS) and the maxima (STAT_MAXIMA); see the class."""
        return {**self._stats, "worker_peak_rss_mb": self._peak_rss_mb, "slowest_seconds": self._slowest}

    # -- workers ---------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        return _Worker(self.components, self.target_language, self.template, self.memory_mb, self.max_chars,
                       self.precheck)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()
        self._stats["restarts"] += 1

    def _note_rss(self, mb: float | None) -> None:
        if mb is not None:
            self._peak_rss_mb = max(self._peak_rss_mb, float(mb))

    def _ready_to_read(self, wait: float) -> list[_Worker]:
        poller, by_fd = select.poll(), {}
        for w in self._workers:
            by_fd[w.fileno()] = w
            poller.register(w.fileno(), select.POLLIN)
        return [by_fd[fd] for fd, _ in poller.poll(wait * 1000)]

    def _dispatch(self, todo: deque, tries: dict[int, int], completions: list[str], records: list) -> int:
        """Send work to idle workers; returns how many items were given up (their worker died twice as
        they were sent)."""
        lost = 0
        for w in list(self._workers):
            if w.ready and w.job is None and todo:
                i = todo.popleft()
                try:
                    sent = time.monotonic()
                    _send(w.proc.stdin, (i, completions[i], records[i]))
                    w.job, w.sent = (i, sent + self.timeout), sent
                except OSError:  # died while idle, or while reading this item
                    tries[i] = tries.get(i, 0) + 1
                    if tries[i] < SEND_TRIES:
                        todo.appendleft(i)
                    else:
                        lost += 1
                        self._stats["crashes"] += 1
                    self._replace(w)
        return lost

    def _score_in_workers(self, completions: list[str], records: list) -> list[dict | None]:
        for w in list(self._workers):
            if w.job is not None:  # left over from an interrupted call: its answer would be misfiled
                self._replace(w)
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        rows: list[dict | None] = [None] * len(completions)
        todo = deque(i for i, c in enumerate(completions) if not oversized(c, self.max_chars))
        pending, tries = len(todo), {}
        while pending:
            pending -= self._dispatch(todo, tries, completions, records)
            now = time.monotonic()
            deadlines = [w.job[1] if w.job else w.started + WORKER_START_TIMEOUT_S
                         for w in self._workers if w.job or not w.ready]
            wait = max(min(deadlines) - now, 0.0) if deadlines else 0.0
            for w in self._ready_to_read(wait):
                try:
                    msg = _recv(w.proc.stdout)
                except (EOFError, OSError, pickle.UnpicklingError):
                    msg = None
                if msg == "ready":
                    w.ready = True
                elif msg is not None and w.job is not None:
                    i, scores, info = msg
                    if "unavailable" in info:
                        raise SandboxUnavailable(info["unavailable"])
                    rows[i], w.job, pending = scores, None, pending - 1
                    self._slowest = max(self._slowest, time.monotonic() - w.sent)
                    self._stats["refusals"] += int(info.get("refused", 0))
                    self._note_rss(info.get("peak_rss_mb"))
                else:  # crashed (e.g. out of its address space): its item scores 0
                    if not w.ready:
                        raise RuntimeError("a reward worker exited while starting (its stderr is above; "
                                           f"memory_mb={self.memory_mb} may be too small)")
                    if w.job is not None:
                        pending -= 1
                        self._stats["crashes"] += 1
                        self._slowest = max(self._slowest, time.monotonic() - w.sent)
                    self._replace(w)
            now = time.monotonic()
            for w in list(self._workers):
                if w.job is not None and now >= w.job[1]:  # hung: the item scores 0
                    self._note_rss(peak_rss_mb(w.proc.pid))
                    self._slowest = max(self._slowest, now - w.sent)
                    pending -= 1
                    self._stats["timeouts"] += 1
                    self._replace(w)
                elif not w.ready and now >= w.started + WORKER_START_TIMEOUT_S:
                    raise RuntimeError(f"a reward worker did not start within {WORKER_START_TIMEOUT_S:.0f} s")
        return rows

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        workers, self._workers = self._workers, []
        for w in workers:
            w.hang_up()
        deadline = time.monotonic() + 1.0
        for w in workers:
            w.close(max(deadline - time.monotonic(), 0.0))

    def __enter__(self) -> RewardFn:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
