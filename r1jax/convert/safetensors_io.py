"""Streaming safetensors I/O: memory-mapped reads of tensor slices, sequential sharded writes.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} and the raw little-endian bytes. Reading maps the file and slices the tensor in
place, so reading one expert's rows of a 700 GB checkpoint touches only those pages; writing emits
each tensor's bytes as soon as it is given, so neither direction holds the checkpoint in memory.
FP8 weights (DeepSeek-V3/R1: float8_e4m3fn with a float32 `<name>_scale_inv` per 128x128 block)
are dequantised on read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

from r1jax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
FP8 = ("F8_E4M3", "F8_E5M2")
SCALE_SUFFIX = "_scale_inv"


def dequantize_fp8_blocks(w: np.ndarray, scale_inv: np.ndarray, block: Sequence[int] = (128, 128),
                          row0: int = 0, col0: int = 0) -> np.ndarray:
    """float32 W[r, c] = fp8 W[r, c] * scale_inv[(row0 + r) // block_r, (col0 + c) // block_c].

    `w` is a [rows, cols] window of the full weight starting at (row0, col0); `scale_inv` is the
    whole [ceil(R / block_r), ceil(C / block_c)] scale grid of the full weight.
    """
    br, bc = block
    rows = (row0 + np.arange(w.shape[0])) // br
    cols = (col0 + np.arange(w.shape[1])) // bc
    return w.astype(np.float32) * scale_inv.astype(np.float32)[rows[:, None], cols[None, :]]


class SafetensorsFile:
    """One .safetensors file, memory-mapped; tensors are views into the map (no copy until used)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > os.path.getsize(self.path) - 8:
                    raise CheckpointError(f"{self.path}: header length {n} exceeds the file size (truncated file?)")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._data_start = 8 + n
        self._map: np.memmap | None = None
        size = os.path.getsize(self.path) - self._data_start
        for name, e in self.entries.items():
            if e["dtype"] not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
            begin, end = e["data_offsets"]
            if end > size or end - begin != math.prod(e["shape"]) * DTYPES[e["dtype"]].itemsize:
                raise CheckpointError(f"{self.path}: tensor {name} has inconsistent offsets (truncated file?)")

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped numpy array."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self.entries[name]
        begin, end = e["data_offsets"]
        raw = self._map[self._data_start + begin:self._data_start + end]
        return raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])


class Checkpoint:
    """A HF checkpoint directory (or one .safetensors file): name -> lazily read tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_file():
            files = [self.path]
            self.dir = self.path.parent
        elif self.path.is_dir():
            self.dir = self.path
            index = self.path / "model.safetensors.index.json"
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                files = [self.path / f for f in sorted(set(weight_map.values()))]
            else:
                files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no .safetensors files")
        else:
            raise CheckpointError(f"{self.path}: checkpoint not found")
        self.files = [SafetensorsFile(f) for f in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.entries:
                self._where[name] = f
        self.config = json.loads((self.dir / "config.json").read_text()) if (self.dir / "config.json").exists() else {}
        qc = self.config.get("quantization_config") or {}
        self.fp8_block = tuple(qc.get("weight_block_size", (128, 128)))

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> str:
        return self._entry(name)["dtype"]

    def _entry(self, name: str) -> dict:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name} not found")
        return self._where[name].entries[name]

    def is_fp8(self, name: str) -> bool:
        return self.dtype(name) in FP8 and (name + SCALE_SUFFIX) in self._where

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """float32 copy of tensor[index] (index: one slice per dim), FP8 blocks dequantised."""
        self._entry(name)  # clear error when missing
        arr = self._where[name].array(name)
        index = index or tuple(slice(None) for _ in arr.shape)
        part = arr[index]
        if self.is_fp8(name):
            if arr.ndim != 2:
                raise CheckpointError(f"{self.path}: FP8 tensor {name} is not 2-D")
            scale = self._where[name + SCALE_SUFFIX].array(name + SCALE_SUFFIX)
            r0 = index[0].indices(arr.shape[0])[0]
            c0 = index[1].indices(arr.shape[1])[0]
            return dequantize_fp8_blocks(part, scale, self.fp8_block, r0, c0)
        return np.array(part, dtype=np.float32)


class SafetensorsWriter:
    """Writes tensors in a fixed plan order into shards of at most `max_shard_bytes`.

    Headers are computed from the plan up front, so each tensor's bytes go to disk when `write`
    is called and nothing accumulates in memory. With more than one shard an HF
    `model.safetensors.index.json` is written by `close()`.
    """

    def __init__(self, out_dir: str | Path, plan: Iterable[tuple[str, Sequence[int], np.dtype]],
                 max_shard_bytes: int = 5 * 2**30, metadata: dict | None = None):
        self.out_dir = Path(out_dir)
        self.plan = [(n, tuple(int(d) for d in s), np.dtype(dt)) for n, s, dt in plan]
        self._planned = {n: (s, dt) for n, s, dt in self.plan}
        shards: list[list] = [[]]
        size = 0
        for item in self.plan:
            nbytes = math.prod(item[1]) * item[2].itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += nbytes
        n = len(shards)
        self.shards = [(("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"), items)
                       for i, items in enumerate(shards)]
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [name for _, items in self.shards for name, _, _ in items]
        self._pos = 0
        self._file = None
        self._shard = -1

    def _open_next(self):
        if self._file:
            self._file.close()
        self._shard += 1
        fname, items = self.shards[self._shard]
        header, offset = {"__metadata__": self.metadata}, 0
        for name, shape, dt in items:
            nbytes = math.prod(shape) * dt.itemsize
            header[name] = {"dtype": NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.out_dir / fname, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._remaining = len(items)

    def write(self, name: str, array: np.ndarray) -> None:
        if self._pos >= len(self._order) or name != self._order[self._pos]:
            expected = self._order[self._pos] if self._pos < len(self._order) else "nothing"
            raise ValueError(f"SafetensorsWriter: got {name}, expected {expected} next")
        if self._file is None or self._remaining == 0:
            self._open_next()
        shape, dt = self._planned[name]
        arr = np.ascontiguousarray(np.asarray(array).astype(dt, copy=False))
        if arr.shape != shape:
            raise ValueError(f"SafetensorsWriter: {name} has shape {arr.shape}, planned {shape}")
        self._file.write(arr.tobytes())
        self._remaining -= 1
        self._pos += 1

    def close(self) -> None:
        if self._pos != len(self._order):
            raise ValueError(f"SafetensorsWriter: {len(self._order) - self._pos} planned tensors were not written")
        if self._file:
            self._file.close()
            self._file = None
        if len(self.shards) > 1:
            total = sum(math.prod(s) * d.itemsize for _, s, d in self.plan)
            index = {"metadata": {"total_size": total},
                     "weight_map": {name: fname for fname, items in self.shards for name, _, _ in items}}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
