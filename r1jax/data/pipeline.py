"""grain input pipelines: source -> shuffle/repeat -> tokenize -> pack -> rows -> global batches.

The global batch of every step is made of `num_shards` loader shards, each contributing
batch_size / num_shards rows from its own deterministic stream (shard s reads examples s, s + N,
s + 2N, ... of the shuffled source). Each process runs only the shards it owns, and builds the
global jax.Array with `jax.make_array_from_process_local_data`. Because a shard's stream depends
only on (seed, s, N), the global batch of step t is the same whatever the number of processes,
and a run restarts on a different process count with identical data as long as N is kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grain
import grain.experimental as grain_exp
import jax
import numpy as np

from r1jax.config import ConfigError, DataConfig
from r1jax.errors import DataError
from r1jax.tokenizer import Tokenizer, encode_example, render_completion, render_prompt

ROW_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def make_source(cfg: DataConfig, split: str):
    """The random-access record source that `cfg` names, for `split`. data.train_path (a JSONL file,
    e.g. a rejection-sampling dataset) replaces the source's training split; other splits (held-out
    evaluation) still come from `source`. data.general_share > 0 mixes general prompts (the parity
    task) into it (procedural.MixedTask)."""
    from r1jax.data import procedural

    if cfg.general_share > 0 and cfg.source != "parity_preference":
        import dataclasses

        reasoning = make_source(dataclasses.replace(cfg, general_share=0.0), split)
        general = procedural.ParityPreferenceTask(cfg.seed, split, cfg.size, demo_flaw_rate=cfg.general_flaw_rate,
                                                 demo_wrong_share=cfg.general_flaw_wrong_share)
        return procedural.MixedTask(reasoning, general, cfg.general_share)
    return _make_source(cfg, split)


def _make_source(cfg: DataConfig, split: str):
    from r1jax.data import procedural, sources

    if cfg.train_path and split == cfg.split:
        return jsonl_source(cfg, cfg.train_path, "data.train_path")

    if cfg.source == "arithmetic":
        return procedural.ArithmeticTask(cfg.seed, split, cfg.size, min_digits=cfg.min_digits,
                                         max_digits=cfg.max_digits, ops=tuple(cfg.ops), flaw_rate=cfg.flaw_rate)
    if cfg.source == "countdown":
        return procedural.CountdownTask(cfg.seed, split, cfg.size, n_numbers=cfg.n_numbers)
    if cfg.source == "parity_preference":
        return procedural.ParityPreferenceTask(cfg.seed, split, cfg.size)
    if cfg.source == "jsonl":
        return jsonl_source(cfg, cfg.path, "data.path")
    if cfg.source == "gsm8k":
        return sources.gsm8k(split)
    if cfg.source in ("math500", "aime2024"):
        return sources.EVAL_SETS[cfg.source]()
    if cfg.source == "tfds":
        from r1jax.data import tfds_builders

        return tfds_builders.tfds_source(cfg.name, split, cfg.path)
    raise ConfigError(f"data.source: unknown source {cfg.source!r}")


def jsonl_source(cfg: DataConfig, path: str, key: str):
    """The JSONL file `path` (set by config key `key`) read under cfg's record-size policy; a file
    with no records (empty, blank, or only oversized lines) is refused here, naming it, before
    anything (a tokenizer's training) reads it."""
    from r1jax.data import sources

    src = sources.JsonlSource(path, max_record_bytes=cfg.max_record_bytes, oversized=cfg.oversized)
    if not len(src):
        why = (f"all {len(src.skipped)} of its lines exceed data.max_record_bytes={cfg.max_record_bytes}"
               if src.skipped else "it is empty or holds only blank lines")
        raise DataError(f"{key}: {path}: no records to read ({why})")
    return src


def stated_answer(record: dict) -> str:
    """The answer an SFT target states: a deliberately flawed demonstration's "target_answer" (see
    procedural.ArithmeticTask flaw_rate), else the record's "answer"."""
    return record.get("target_answer", record["answer"])


class EncodeSFT(grain.transforms.Map):
    """record -> {"inputs": int32 [n], "loss_mask": bool [n]} with the chat template, cut to seq_len."""

    def __init__(self, tokenizer: Tokenizer, template: str, seq_len: int):
        self.tokenizer, self.template, self.seq_len = tokenizer, template, seq_len

    def map(self, record: dict) -> dict:
        # a general prompt's record carries its demonstration as free text ("response")
        ids, mask = encode_example(self.tokenizer, self.template, record["question"], record.get("reasoning", ""),
                                   stated_answer(record), completion_text=record.get("response"))
        return {"inputs": ids[:self.seq_len].astype(np.int32), "loss_mask": mask[:self.seq_len].astype(bool)}


def rows_from_packed(ex: dict) -> dict:
    """Packed {inputs, loss_mask, *_segment_ids, *_positions} -> a training row (see ROW_KEYS).

    targets[i] is the next token of the same document; loss_mask[i] says whether that target is a
    trained (completion) token.
    """
    tokens = ex["inputs"].astype(np.int32)
    seg = ex["inputs_segment_ids"].astype(np.int32)
    same_next = np.zeros_like(seg, bool)
    same_next[:-1] = (seg[1:] == seg[:-1]) & (seg[:-1] != 0)
    targets = np.zeros_like(tokens)
    targets[:-1] = np.where(same_next[:-1], tokens[1:], 0)
    loss_mask = np.zeros(tokens.shape, np.float32)
    loss_mask[:-1] = (same_next[:-1] & ex["loss_mask"][1:].astype(bool)).astype(np.float32)
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask, "segment_ids": seg,
            "positions": ex["inputs_positions"].astype(np.int32)}


class PadToRow(grain.transforms.Map):
    """Unpacked: one example per row, right-padded to seq_len (segment id 1, padding 0)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def map(self, ex: dict) -> dict:
        n, s = len(ex["inputs"]), self.seq_len
        packed = {"inputs": np.zeros(s, np.int32), "loss_mask": np.zeros(s, bool),
                  "inputs_segment_ids": np.zeros(s, np.int32), "inputs_positions": np.zeros(s, np.int32)}
        packed["inputs"][:n] = ex["inputs"]
        packed["loss_mask"][:n] = ex["loss_mask"]
        packed["inputs_segment_ids"][:n] = 1
        packed["inputs_positions"][:n] = np.arange(n)
        return packed


class ToRow(grain.transforms.Map):
    def map(self, ex: dict) -> dict:
        return rows_from_packed(ex)


def shard_dataset(source, tokenizer: Tokenizer, cfg: DataConfig, seq_len: int, rows: int, shard: int,
                  num_shards: int) -> grain.IterDataset:
    """The stream of [rows, seq_len] batches of loader shard `shard` of `num_shards`."""
    if len(source) == 0:
        raise DataError(f"data: the {cfg.source} source has no examples")
    ds = grain.MapDataset.source(source)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(None)[shard::num_shards].map(EncodeSFT(tokenizer, cfg.template, seq_len))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=64))
    if cfg.pack:
        it = grain_exp.FirstFitPackIterDataset(it, length_struct={"inputs": seq_len, "loss_mask": seq_len},
                                               num_packing_bins=cfg.packing_bins, shuffle_bins=False)
        it = it.map(ToRow())
    else:
        it = it.map(PadToRow(seq_len)).map(ToRow())
    it = it.batch(rows, drop_remainder=True)
    if cfg.worker_count > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return it


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app nothing has parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class GlobalBatchLoader:
    """Iterates global batches (dicts of [batch_size, seq_len] jax.Arrays sharded over the batch axes).

    Checkpointable: `state()` returns every shard's iterator state (gathered from all processes),
    `restore(state)` puts this process's shards back where they were.
    """

    def __init__(self, source, tokenizer: Tokenizer, cfg: DataConfig, batch_size: int, seq_len: int,
                 sharding: jax.sharding.NamedSharding | None = None):
        procs, me = jax.process_count(), jax.process_index()
        n = cfg.num_shards or procs
        if n % procs or batch_size % n:
            raise ConfigError(f"data.num_shards: {n} shards must be a multiple of the {procs} processes and divide "
                              f"train.batch_size={batch_size}")
        self.num_shards, self.rows = n, batch_size // n
        self.local_shards = list(range(me * n // procs, (me + 1) * n // procs))
        self.batch_size, self.seq_len, self.sharding = batch_size, seq_len, sharding
        self._datasets = {s: shard_dataset(source, tokenizer, cfg, seq_len, self.rows, s, n) for s in self.local_shards}
        self._iters = {s: iter(d) for s, d in self._datasets.items()}

    def next_local(self) -> dict[str, np.ndarray]:
        """This process's rows of the next global batch (its shards, in shard order)."""
        parts = [next(self._iters[s]) for s in self.local_shards]
        return {k: np.concatenate([p[k] for p in parts]) for k in ROW_KEYS}

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        local = self.next_local()
        if self.sharding is None:
            return {k: jax.numpy.asarray(v) for k, v in local.items()}
        shape = (self.batch_size, self.seq_len)
        return {k: jax.make_array_from_process_local_data(self.sharding, v, shape) for k, v in local.items()}

    def state(self) -> dict:
        """{"num_shards": N, "shards": {str(s): state}} for all N shards (all processes call this)."""
        local = {str(s): self._iters[s].get_state() for s in self.local_shards}
        return {"num_shards": self.num_shards, "shards": _gather_json(local)}

    def close(self) -> None:
        """Stop prefetch threads and worker processes (grain iterators that have them)."""
        for it in self._iters.values():
            if hasattr(it, "close"):
                it.close()
        self._iters = {}

    def restore(self, state: dict) -> None:
        if state.get("num_shards") != self.num_shards:
            raise ConfigError(f"data.num_shards: the checkpoint's data state has {state.get('num_shards')} loader "
                              f"shards, this run {self.num_shards}; set data.num_shards={state.get('num_shards')}")
        for s in self.local_shards:
            self._iters[s].set_state(state["shards"][str(s)])


def _gather_json(local: dict) -> dict:
    """Merge a JSON-able dict from every process (small: iterator states)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(local).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32))
    width = int(np.max(lengths))
    padded = np.zeros(width, np.uint8)
    padded[:raw.size] = raw
    everything = multihost_utils.process_allgather(padded)
    merged: dict = {}
    for row, n in zip(np.asarray(everything).reshape(-1, width), np.asarray(lengths).reshape(-1)):
        merged.update(json.loads(bytes(row[:int(n)]).decode()))
    return merged


def heldout(cfg: DataConfig, n: int) -> list[dict]:
    """The first n records of the evaluation split (deterministic)."""
    src = make_source(cfg, cfg.eval_split)
    return [src[i] for i in range(min(n, len(src)))]


def tokenizer_corpus(source, template: str, n: int) -> Iterator[str]:
    """Texts to train a tokenizer on: the first n examples of `source` rendered with `template`.
    DataError naming the source (its file) if it has none."""
    if not len(source):
        raise DataError(f"tokenizer: {getattr(source, 'path', source)}: no records to train a tokenizer on")
    for i in range(min(n, len(source))):
        r = source[i]
        yield render_prompt(template, r["question"]) + render_completion(template, r.get("reasoning", ""),
                                                                         stated_answer(r))
