"""The grain pipeline: packed rows, iterator state restore, worker processes."""

import functools
import tempfile

import numpy as np
import pytest

from conftest import CONFIGS
from r1jax.config import load_config
from r1jax.data.pipeline import GlobalBatchLoader, heldout, make_source, tokenizer_corpus
from r1jax.tokenizer import Tokenizer


@functools.cache
def setup():
    cfg = load_config(CONFIGS / "sft_arithmetic.yaml", ["data.ops=['+','-']"])
    src = make_source(cfg.data, "train")
    with tempfile.TemporaryDirectory() as d:
        tok = Tokenizer.train_sentencepiece(tokenizer_corpus(src, cfg.data.template, 500), d, 340)
        tok = Tokenizer.from_files(tok.files())
    return cfg, src, tok


def loader(**data):
    cfg, src, tok = setup()
    import dataclasses

    return GlobalBatchLoader(src, tok, dataclasses.replace(cfg.data, **data), 8, 256)


def test_rows_are_consistent_packed_documents():
    cfg, src, tok = setup()
    b = loader().next_local()
    seg, tokens, targets, mask, pos = (b[k] for k in ("segment_ids", "tokens", "targets", "loss_mask", "positions"))
    assert seg.shape == (8, 256) and (seg.max(1) >= 2).all()  # several documents per row
    same_next = np.zeros_like(seg, bool)
    same_next[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    np.testing.assert_array_equal(targets[:, :-1][same_next[:, :-1]], tokens[:, 1:][same_next[:, :-1]])
    assert (mask[~same_next] == 0).all()  # no target across documents or into padding
    for r in range(8):  # positions restart at every document
        for s in np.unique(seg[r][seg[r] > 0]):
            np.testing.assert_array_equal(pos[r][seg[r] == s], np.arange((seg[r] == s).sum()))
    # each document's trained tokens decode to exactly its completion (reasoning + answer)
    r, s = 0, 1
    doc = seg[r] == s
    text = tok.decode(targets[r][doc & (mask[r] > 0)].tolist(), skip_special=True)
    assert text.startswith("<think>") and text.endswith("</answer>.")


def test_iterator_state_restores_exactly():
    a = loader(num_shards=2)
    for _ in range(3):
        a.next_local()
    state = a.state()
    expect = [a.next_local() for _ in range(2)]
    b = loader(num_shards=2)
    b.restore(state)
    for e in expect:
        got = b.next_local()
        assert all(np.array_equal(e[k], got[k]) for k in e)
    c = loader(num_shards=4)
    with pytest.raises(Exception, match="num_shards"):
        c.restore(state)


def test_worker_processes_give_the_same_batches():
    a, b = loader(worker_count=1), loader(worker_count=0)
    try:
        for _ in range(2):
            x, y = a.next_local(), b.next_local()
            assert all(np.array_equal(x[k], y[k]) for k in x)
    finally:
        a.close()
        b.close()


# ---- files that cannot be trained on: refused by name before anything reads them -------------------


def _jsonl_cfg(path, **data):
    from r1jax.config import DataConfig

    return DataConfig(source="jsonl", path=str(path), **data)


@pytest.mark.parametrize("text", ["", "\n\n   \n\t\n"])
def test_empty_or_blank_jsonl_is_named_before_tokenizer_training(tmp_path, text):
    from r1jax.errors import DataError

    path = tmp_path / "train.jsonl"
    path.write_text(text)
    with pytest.raises(DataError) as e:
        make_source(_jsonl_cfg(path), "train")
    assert str(e.value) == f"data.path: {path}: no records to read (it is empty or holds only blank lines)"
    with pytest.raises(DataError, match=f"data.train_path: {path}: no records"):
        make_source(_jsonl_cfg(tmp_path / "unused.jsonl", train_path=str(path)), "train")


def test_tokenizer_corpus_of_an_empty_source_names_it(tmp_path):
    from r1jax.data.sources import JsonlSource
    from r1jax.errors import DataError

    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=f"tokenizer: {path}: no records to train a tokenizer on"):
        Tokenizer.train_sentencepiece(tokenizer_corpus(JsonlSource(path), "r1", 10), tmp_path, 300)


def test_record_size_policy_comes_from_the_config(tmp_path, capsys):
    import json

    from r1jax.errors import DataError

    lines = [json.dumps({"question": "q" * n, "answer": "1"}) for n in (10, 3000, 20)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    src = make_source(_jsonl_cfg(path, max_record_bytes=1000), "train")
    assert len(src) == 2 and src.skipped == [(2, len(lines[1]))]
    assert f"{path}:2: record of {len(lines[1])} bytes exceeds data.max_record_bytes=1000" in capsys.readouterr().err
    assert len(make_source(_jsonl_cfg(path), "train")) == 3  # the default limit (4 MiB) keeps it
    with pytest.raises(DataError, match=f"{path}:2: record of {len(lines[1])} bytes exceeds"):
        make_source(_jsonl_cfg(path, max_record_bytes=1000, oversized="error"), "train")
    with pytest.raises(DataError, match=r"all 3 of its lines exceed data\.max_record_bytes=5"):
        make_source(_jsonl_cfg(path, max_record_bytes=5), "train")


def test_heldout_eval_records_refuse_a_lone_surrogate(tmp_path):
    from r1jax.errors import DataError

    path = tmp_path / "eval.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{"question": "\\ud800", "answer": "2"}\n')
    with pytest.raises(DataError, match=f"{path}:2: field 'question': lone surrogate"):
        heldout(_jsonl_cfg(path), 2)
