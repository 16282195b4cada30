"""JSON Lines sources and the evaluation sets shipped in `r1jax/data/eval/`.

A source is grain's random-access kind: `len(src)`, `src[i] -> record`, picklable. Records are
{"id", "question", "reasoning", "answer"} (str) plus any extras. `JsonlSource` keeps only the path
and a numpy array of line offsets; each process opens its own descriptor on first read and reads
lines with `os.pread`, so worker processes and reader threads never share a file position.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from r1jax.errors import DataError

EVAL_DIR = Path(__file__).resolve().parent / "eval"
DEFAULT_FIELDS = {"question": "question", "reasoning": "reasoning", "answer": "answer"}
OPTIONAL_FIELDS = {"reasoning": ""}  # record keys a JSON line may lack, with their default

_open_lock = threading.Lock()


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
    ):
        self.path = str(path)
        self.fields = dict(DEFAULT_FIELDS if fields is None else fields)
        self.extract = extract
        self._fd: int | None = None
        self._pid: int | None = None
        starts, lengths, linenos = [], [], []
        try:
            with open(self.path, "rb") as f:  # streamed: a large file is never held whole
                pos = 0
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        starts.append(pos)
                        lengths.append(len(line))
                        linenos.append(lineno)
                        if validate:
                            self._parse(line, lineno)
                    pos += len(line)
        except OSError as e:
            raise DataError(f"{self.path}: cannot read ({e.strerror or e})") from None
        self.offsets = np.asarray(starts, np.int64)  # [n] byte offset of each record's line
        self.lengths = np.asarray(lengths, np.int64)  # [n] its length in bytes
        self.linenos = np.asarray(linenos, np.int64)  # [n] its 1-based line number

    def __len__(self) -> int:
        return len(self.offsets)

    def _parse(self, line: bytes, lineno: int) -> dict[str, Any]:
        where = f"{self.path}:{lineno}"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: invalid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
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
