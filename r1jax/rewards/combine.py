"""The weighted rule-based reward the GRPO driver calls: `RewardFn(weights)(completions, records)`.

Scoring runs in worker processes that talk to the caller over pipes, so a completion whose scoring
hangs (sympy on a pathological expression, a program that sleeps) costs at most `timeout` seconds:
its worker is killed, replaced, and the completion scores 0 on every component. Workers are plain
`python -c` subprocesses (not fork: the caller has JAX threads; not multiprocessing's spawn either,
which would re-import the caller's `__main__` and with it JAX) that import only r1jax.rewards.
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

from r1jax.rewards.accuracy import accuracy_reward, is_code_record
from r1jax.rewards.code import SCRATCH_ENV, code_reward
from r1jax.rewards.format import format_reward
from r1jax.rewards.language import LANGUAGE_PREDICATES, language_consistency

COMPONENTS = ("accuracy", "format", "language", "code")
WORKER_START_TIMEOUT_S = 120.0


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


def score_components(completion: str, record: Mapping[str, Any], components: Sequence[str],
                     target_language: str = "en", template: str = "r1_zero") -> dict[str, float]:
    """{component: score in [0, 1]} for one completion. "code" is the sandboxed test result for a
    record with "tests" (0.0 for any other record); "accuracy" of such a record is that same result
    (run once). A component that raises scores 0.0."""
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


def worker_main(components: Sequence[str], target_language: str, template: str = "r1_zero") -> None:
    """Loop of a worker process: (index, completion, record) in, (index, scores) out."""
    _die_with_parent()
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
        _send(out, (index, score_components(completion, record, components, target_language, template)))


class _Worker:
    def __init__(self, components: Sequence[str], target_language: str, template: str):
        # Its sandbox directories go here, so that killing a hung worker leaves none behind. Others may
        # traverse (the sandbox may run as nobody) but not list it.
        self.scratch = tempfile.mkdtemp(prefix="r1jax-reward-worker-")
        os.chmod(self.scratch, 0o711)
        env = dict(os.environ)
        env[SCRATCH_ENV] = self.scratch
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        boot = ("from r1jax.rewards.combine import worker_main; "
                f"worker_main({tuple(components)!r}, {target_language!r}, {template!r})")
        self.proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0, env=env, start_new_session=True)
        self.started = time.monotonic()
        self.ready = False
        self.job: tuple[int, float] | None = None  # (item index, deadline)

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
    inline: score in the calling process instead (no timeout; for tests and debugging).
    """

    def __init__(self, weights: Any, *, timeout: float = 10.0, workers: int = 0, target_language: str = "en",
                 template: str = "r1_zero", inline: bool = False):
        if target_language not in LANGUAGE_PREDICATES:
            raise ValueError(f"unknown target language {target_language!r}; known: {', '.join(LANGUAGE_PREDICATES)}")
        self.weights = {k: w for k, w in reward_weights(weights).items() if w != 0.0}
        self.components = tuple(name for name in COMPONENTS if name in self.weights)
        self.timeout = float(timeout)
        self.num_workers = workers if workers > 0 else min(4, os.cpu_count() or 1)
        self.target_language = target_language
        self.template = template
        self.inline = inline
        self._workers: list[_Worker] = []

    def __call__(self, completions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        if len(completions) != len(records):
            raise ValueError(f"{len(completions)} completions but {len(records)} records")
        if self.inline or not self.components:
            rows = [score_components(c, r, self.components, self.target_language, self.template)
                    for c, r in zip(completions, records, strict=True)]
        else:
            rows = self._score_in_workers(list(completions), list(records))
        out = {name: np.asarray([(row or {}).get(name, 0.0) for row in rows], np.float32) for name in self.components}
        total = np.zeros(len(rows), np.float32)
        for name in self.components:
            total += np.float32(self.weights[name]) * out[name]
        out["total"] = total
        return out

    # -- workers ---------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        return _Worker(self.components, self.target_language, self.template)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()

    def _ready_to_read(self, wait: float) -> list[_Worker]:
        poller, by_fd = select.poll(), {}
        for w in self._workers:
            by_fd[w.fileno()] = w
            poller.register(w.fileno(), select.POLLIN)
        return [by_fd[fd] for fd, _ in poller.poll(wait * 1000)]

    def _score_in_workers(self, completions: list[str], records: list) -> list[dict | None]:
        for w in list(self._workers):
            if w.job is not None:  # left over from an interrupted call: its answer would be misfiled
                self._replace(w)
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        rows: list[dict | None] = [None] * len(completions)
        todo = deque(range(len(completions)))
        pending = len(completions)
        while pending:
            for w in list(self._workers):
                if w.ready and w.job is None and todo:
                    i = todo.popleft()
                    try:
                        _send(w.proc.stdin, (i, completions[i], records[i]))
                        w.job = (i, time.monotonic() + self.timeout)
                    except OSError:  # died while idle: retry the item elsewhere
                        todo.appendleft(i)
                        self._replace(w)
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
                    i, scores = msg
                    rows[i], w.job, pending = scores, None, pending - 1
                else:  # crashed: its item scores 0
                    if not w.ready:
                        raise RuntimeError("a reward worker exited while starting (its stderr is above)")
                    if w.job is not None:
                        pending -= 1
                    self._replace(w)
            now = time.monotonic()
            for w in list(self._workers):
                if w.job is not None and now >= w.job[1]:  # hung: the item scores 0
                    pending -= 1
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
