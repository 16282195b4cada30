"""JSON Lines sources and the evaluation sets shipped in `r1jax/data/eval/`.

A source is grain's random-access kind: `len(src)`, `src[i] -> record`, picklable. Records are
{"id", "question", "reasoning", "answer"} (str) plus any extras. `JsonlSource` keeps only the path
and a numpy array of line offsets; each process opens its own descriptor on first read and reads
lines with `os.pread`, so worker processes and reader threads never share a file position.

Every line is read in pieces of bounded size (`read_lines`): a line longer than `max_record_bytes`
is never held whole; it is skipped with a warning naming file:line and size (and counted in
`JsonlSource.skipped`), or refused, as `oversized` says. Text must be valid Unicode: a JSON string
with a lone surrogate (`"\\ud800"`) is refused by file:line, as malformed JSON is.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from r1jax.config import MAX_RECORD_BYTES
from r1jax.errors import DataError

EVAL_DIR = Path(__file__).resolve().parent / "eval"
DEFAULT_FIELDS = {"question": "question", "reasoning": "reasoning", "answer": "answer"}
OPTIONAL_FIELDS = {"reasoning": ""}  # record keys a JSON line may lack, with their default

_open_lock = threading.Lock()
_CHUNK = 1 << 20  # bytes read at a time while passing over an oversized line
_SHOWN_SKIPS = 5  # oversized lines named one by one in the warnings; the rest are counted
# Where a lone surrogate can come from: a \\udXXX escape in d800-dfff, or the raw bytes of one (which
# json.loads decodes with "surrogatepass"). A line without either needs no walk over its strings.
_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def read_lines(f: BinaryIO, limit: int) -> Iterator[tuple[int, int, int, int, bytes | None]]:
    """(line number, byte offset, bytes with the newline, bytes without it, line) of each line of the
    binary file `f`; `line` is None when it holds more than `limit` bytes before its newline. No read
    is larger than limit + 1 bytes (1 MiB past the limit), so an oversized line is never held whole."""
    pos, lineno = 0, 0
    while head := f.readline(limit + 1):
        lineno += 1
        n, line = len(head), head
        if not head.endswith(b"\n") and n > limit:
            line = None
            while not head.endswith(b"\n") and (head := f.readline(_CHUNK)):
                n += len(head)
        yield lineno, pos, n, n - head.endswith(b"\n"), line
        pos += n


def _say(text: str) -> None:
    """A warning on stderr, on process 0 only once jax.distributed is up (before that, every process;
    asking jax for the process index here would start the backends too early)."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized() and jax.process_index() != 0:
        return
    print(f"warning: {text}", file=sys.stderr, flush=True)


def lone_surrogate(obj: Any, name: str = "") -> str | None:
    """What is wrong (`"field 'question': lone surrogate \\ud800 at character 3"`) with the first
    string in `obj`, a key or a value, nested dicts and lists included, that holds half of a UTF-16
    surrogate pair; None if none does."""
    if isinstance(obj, str):
        m = _SURROGATE.search(obj)
        return f"field {name!r}: lone surrogate \\u{ord(m.group()):04x} at character {m.start()}" if m else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        inner = f"{name}[{k}]" if isinstance(k, int) else f"{name}.{k}" if name else k
        if isinstance(k, str) and (m := _SURROGATE.search(k)):
            return f"key {inner!r}: lone surrogate \\u{ord(m.group()):04x} at character {m.start()}"
        if found := lone_surrogate(v, inner):
            return found
    return None


class _RecordError(Exception):
    """What is wrong with one line; JsonlSource adds the path and line number."""


def _text(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _RecordError(f"field {key!r} must be a string, got {type(value).__name__}")


def _map_fields(obj: dict[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    """Record keys from JSON keys per `fields`; unmapped JSON keys pass through as extras."""
    record = {k: v for k, v in obj.items() if k not in fields.values() and k not in fields}
    for key, json_key in fields.items():
        if json_key in obj:
            record[key] = _text(obj[json_key], json_key)
        elif key in OPTIONAL_FIELDS:
            record[key] = OPTIONAL_FIELDS[key]
        else:
            raise _RecordError(f"missing field {json_key!r}")
    return record


class JsonlSource:
    """Random-access records from a JSON Lines file (one object per non-blank line).

    Args:
      path: the .jsonl file.
      fields: record key -> JSON key; default question/reasoning/answer under their own names. Every
        mapped JSON key must be present except the one for "reasoning" (default ""). JSON keys not
        mapped pass through unchanged as extras.
      extract: optional `extract(obj) -> dict` replacing the field mapping, for dataset-specific
        conversion. A KeyError it raises reads as a missing field; its result needs "question" and
        "answer" and gets "reasoning" "" if it has none.
      validate: parse and convert every line now, so a bad file fails at construction.
      max_record_bytes: the longest line (bytes, without its newline) that counts as a record (the
        config's data.max_record_bytes); a longer one is never read whole.
      oversized: "skip" a longer line (a warning names file:line and size; `skipped` lists
        (line number, bytes)) or raise "error".

    The record's "id" is the JSON "id" when present, else "{file name}:{line number}" (1-based).
    Errors are `DataError("{path}:{line}: {what is wrong}")`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fields: Mapping[str, str] | None = None,
        *,
        extract: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        validate: bool = True,
        max_record_bytes: int = MAX_RECORD_BYTES,
        oversized: str = "skip",
    ):
        if oversized not in ("skip", "error") or max_record_bytes <= 0:
            raise ValueError(f"JsonlSource: oversized must be 'skip' or 'error' and max_record_bytes > 0, got "
                             f"{oversized!r}, {max_record_bytes}")
        self.path = str(path)
        self.fields = dict(DEFAULT_FIELDS if fields is None else fields)
        self.extract = extract
        self.max_record_bytes = max_record_bytes
        self._fd: int | None = None
        self._pid: int | None = None
        self.skipped: list[tuple[int, int]] = []  # (line number, bytes) of the oversized lines skipped
        starts, lengths, linenos = [], [], []
        try:
            with open(self.path, "rb") as f:  # streamed in bounded reads: a large file is never held whole
                for lineno, pos, n, size, line in read_lines(f, max_record_bytes):
                    if line is None:
                        self._oversized(lineno, size, oversized)
                    elif line.strip():
                        starts.append(pos)
                        lengths.append(n)
                        linenos.append(lineno)
                        if validate:
                            self._parse(line, lineno)
        except OSError as e:
            raise DataError(f"{self.path}: cannot read ({e.strerror or e})") from None
        if self.skipped:
            _say(f"{self.path}: skipped {len(self.skipped)} oversized record(s) in all (over data.max_record_bytes="
                 f"{max_record_bytes}, the largest {max(b for _, b in self.skipped)} bytes); kept {len(starts)}")
        self.offsets = np.asarray(starts, np.int64)  # [n] byte offset of each record's line
        self.lengths = np.asarray(lengths, np.int64)  # [n] its length in bytes
        self.linenos = np.asarray(linenos, np.int64)  # [n] its 1-based line number

    def __len__(self) -> int:
        return len(self.offsets)

    def _oversized(self, lineno: int, size: int, policy: str) -> None:
        what = f"{self.path}:{lineno}: record of {size} bytes exceeds data.max_record_bytes={self.max_record_bytes}"
        if policy == "error":
            raise DataError(f"{what} (data.oversized=skip skips such records)")
        self.skipped.append((lineno, size))
        if len(self.skipped) <= _SHOWN_SKIPS:
            _say(f"{what}; skipped it (data.oversized=error refuses the file instead)")

    def _parse(self, line: bytes, lineno: int) -> dict[str, Any]:
        where = f"{self.path}:{lineno}"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: invalid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if _SURROGATE_HINT.search(line):
            bad = lone_surrogate(obj)
            if bad:
                raise DataError(f"{where}: {bad}: not valid Unicode text (half of a UTF-16 surrogate pair)")
        try:
            record = self._convert(obj)
        except _RecordError as e:
            raise DataError(f"{where}: {e}") from None
        except KeyError as e:
            raise DataError(f"{where}: missing field {e.args[0]!r}") from None
        if "id" in obj:
            record["id"] = str(obj["id"])
        record.setdefault("id", f"{os.path.basename(self.path)}:{lineno}")
        return record

    def _convert(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.extract is None:
            return _map_fields(obj, self.fields)
        record = self.extract(obj)
        if not isinstance(record, dict):
            raise _RecordError(f"extract returned {type(record).__name__}, not a dict")
        for key in ("question", "answer"):
            if key not in record:
                raise _RecordError(f"extract gave no {key!r}")
            record[key] = _text(record[key], key)
        record["reasoning"] = _text(record.get("reasoning", ""), "reasoning")
        return record

    def _descriptor(self) -> int:
        with _open_lock:
            if self._fd is None or self._pid != os.getpid():
                try:
                    self._fd = os.open(self.path, os.O_RDONLY)
                except OSError as e:
                    raise DataError(f"{self.path}: cannot read ({e.strerror or e})") from None
                self._pid = os.getpid()
            return self._fd

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} records in {self.path}")
        i %= n
        line = os.pread(self._descriptor(), int(self.lengths[i]), int(self.offsets[i]))
        return self._parse(line, int(self.linenos[i]))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        fd, pid = getattr(self, "_fd", None), getattr(self, "_pid", None)
        if fd is not None and pid == os.getpid():
            os.close(fd)

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, {len(self)} records)"


# --------------------------------------------------------------------------------------------------
# Shipped evaluation sets (see eval/README.md for sources and licenses)
# --------------------------------------------------------------------------------------------------

_CALCULATOR = re.compile(r"<<.*?>>")


def gsm8k_extract(obj: dict[str, Any]) -> dict[str, Any]:
    """GSM8K line -> record: the solution before '####' without '<<calc>>' notes; final_answer."""
    solution = obj["answer"].split("####", 1)[0]
    return {
        "question": obj["question"],
        "reasoning": _CALCULATOR.sub("", solution).strip(),
        "answer": obj["final_answer"],
    }


def problem_extract(obj: dict[str, Any]) -> dict[str, Any]:
    """MATH-500 / AIME line -> record: problem and answer verbatim, no worked solution."""
    return {"question": obj["problem"], "reasoning": "", "answer": obj["answer"]}


def _only_test(name: str, split: str) -> None:
    if split != "test":
        raise DataError(f"{name}: has only a 'test' split, not {split!r}")


def gsm8k(split: str = "test") -> JsonlSource:
    """GSM8K (Cobbe et al. 2021): 'test' 1319 or 'train' 7473 grade-school word problems."""
    if split not in ("train", "test"):
        raise DataError(f"gsm8k: split must be 'train' or 'test', not {split!r}")
    return JsonlSource(EVAL_DIR / f"gsm8k_{split}.jsonl", extract=gsm8k_extract)


def math500(split: str = "test") -> JsonlSource:
    """MATH-500 (Lightman et al. 2023): 500 competition problems, LaTeX answers kept verbatim."""
    _only_test("math500", split)
    return JsonlSource(EVAL_DIR / "math500.jsonl", extract=problem_extract)


def aime2024(split: str = "test") -> JsonlSource:
    """AIME 2024 I and II: 30 problems with integer answers (as strings)."""
    _only_test("aime2024", split)
    return JsonlSource(EVAL_DIR / "aime2024.jsonl", extract=problem_extract)


EVAL_SETS: dict[str, Callable[..., JsonlSource]] = {"gsm8k": gsm8k, "math500": math500, "aime2024": aime2024}
