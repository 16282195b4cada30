"""Preference pairs for reward models: sources, encoding, and a resumable batch loader.

A pair record holds "question" (the prompt), "chosen" and "rejected" (two responses to it, the
first preferred) and optionally "margin" (a float >= 0: how much better chosen is; Llama 2's
margin loss). From a JSONL file, each line is {"prompt", "chosen", "rejected"[, "margin"][, "id"]}
and a malformed line fails as one `DataError` naming file:line; or from the procedural
`ParityPreferenceTask` (data.source=parity_preference).

Each side is encoded as the training forward reads a response: [bos] + the rendered prompt
(data.template) + the response + [eos]; its score is read at the eos. A side longer than
train.seq_len keeps its last seq_len tokens (the response and its eos), so the score still reads
the response's end.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from r1jax.config import Config, DataConfig
from r1jax.data.sources import JsonlSource, _RecordError
from r1jax.errors import DataError
from r1jax.tokenizer import Tokenizer, encode_prompt

PAIR_KEYS = ("chosen_tokens", "chosen_segment_ids", "chosen_last", "rejected_tokens", "rejected_segment_ids",
             "rejected_last", "margin")


def pair_extract(obj: dict[str, Any]) -> dict[str, Any]:
    """A JSONL preference line -> record (KeyError: a missing field, named by JsonlSource)."""
    record = {"question": obj["prompt"], "answer": "", "chosen": obj["chosen"], "rejected": obj["rejected"]}
    for key in ("question", "chosen", "rejected"):
        if not isinstance(record[key], str):
            raise DataError(f"field {'prompt' if key == 'question' else key!r} must be a string, got "
                            f"{type(record[key]).__name__}")
    margin = obj.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise DataError(f"field 'margin' must be a finite number >= 0, got {margin!r}")
    record["margin"] = float(margin)
    if "scenario" in obj:
        record["scenario"] = str(obj["scenario"])
    return record


class _PairJsonl(JsonlSource):
    """JsonlSource of preference lines: errors read "{file}:{line}: {what is wrong}"."""

    def _convert(self, obj):
        try:
            return pair_extract(obj)
        except DataError as e:
            raise _RecordError(str(e)) from None


def preference_source(cfg: DataConfig, split: str, path: str = ""):
    """The pairs of `split`: the JSONL at `path` (or data.path for source jsonl), else data.source's
    procedural pairs (parity_preference)."""
    from r1jax.data.pipeline import make_source

    path = path or (cfg.path if cfg.source == "jsonl" else "")
    if path:
        src = _PairJsonl(path, max_record_bytes=cfg.max_record_bytes, oversized=cfg.oversized)
        if not len(src):
            raise DataError(f"{path}: no preference pairs to read (empty, blank, or only oversized lines)")
        return src
    src = make_source(cfg, split)
    probe = src[0] if len(src) else {}
    if "chosen" not in probe or "rejected" not in probe:
        raise DataError(f"data.source: {cfg.source} has no preference pairs (records need 'chosen' and 'rejected'; "
                        "use source jsonl with prompt/chosen/rejected lines, or parity_preference)")
    return src


def encode_side(tok: Tokenizer, template: str, prompt: str, response: str, seq_len: int,
                view: str = "response") -> np.ndarray:
    """[bos] + rendered prompt + response (view "summary": only the response's tokens after its last
    </think> id, all of them when it has none) + [eos], int32, its last seq_len tokens at most.

    The summary is cut from the encoded response, not from its text, so a reward model trains on the
    very ids it reads of a sampled rollout (`train.reward_model.rollout_rows` cuts the sampled ids
    the same way): re-encoding the text after </think> drops the space piece that follows the tag
    in a response, and a model trained without it misjudged every rollout that has it."""
    ids = np.asarray(tok.encode(response, add_eos=True), np.int32)
    if view == "summary":
        ends = np.flatnonzero(ids == tok.special_id("</think>"))
        if len(ends):
            ids = ids[ends[-1] + 1:]
    return np.concatenate([encode_prompt(tok, template, prompt), ids])[-seq_len:]


def encode_pairs(records: list[dict], tok: Tokenizer, template: str, seq_len: int,
                 view: str = "response") -> dict[str, np.ndarray]:
    """Host arrays of PAIR_KEYS for `records`: tokens [B, S] right-padded, segment ids (1 on tokens,
    0 on padding), the index of each side's last token (its eos), and the margins [B]."""
    out: dict[str, Any] = {k: [] for k in PAIR_KEYS}
    for r in records:
        for side in ("chosen", "rejected"):
            ids = encode_side(tok, template, r["question"], r[side], seq_len, view)
            row = np.full(seq_len, tok.pad_id, np.int32)
            row[:len(ids)] = ids
            out[f"{side}_tokens"].append(row)
            out[f"{side}_segment_ids"].append((np.arange(seq_len) < len(ids)).astype(np.int32))
            out[f"{side}_last"].append(len(ids) - 1)
        out["margin"].append(r.get("margin", 0.0))
    return {k: np.asarray(v, np.float32 if k == "margin" else np.int32) for k, v in out.items()}


class PairLoader:
    """Global batches of `batch_size` pairs, in a seeded order that reshuffles every epoch; each
    process builds the whole batch (pairs are small) and places it with `sharding`. Resumable:
    `state()` is the position, `restore(state)` goes back to it."""

    def __init__(self, source, tok: Tokenizer, cfg: Config, sharding, vec_sharding):
        self.source, self.tok, self.cfg = source, tok, cfg
        self.sharding, self.vec_sharding = sharding, vec_sharding
        self.position = 0

    def state(self) -> dict:
        return {"position": self.position}

    def restore(self, state: dict) -> None:
        self.position = int(state["position"])

    def _index(self, k: int) -> int:
        n = len(self.source)
        epoch, i = divmod(k, n)
        order = np.random.default_rng([self.cfg.data.seed, epoch]).permutation(n) if self.cfg.data.shuffle \
            else np.arange(n)
        return int(order[i])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = self.cfg.train.batch_size
        records = [self.source[self._index(self.position + j)] for j in range(b)]
        self.position += b
        arrays = encode_pairs(records, self.tok, self.cfg.data.template, self.cfg.train.seq_len, self.cfg.rm.view)
        return {k: _global(v, self.vec_sharding if v.ndim == 1 else self.sharding) for k, v in arrays.items()}


def _global(x: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
