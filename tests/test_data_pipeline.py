"""The grain pipeline: packed rows, iterator state restore, worker processes."""

import functools
import tempfile

import numpy as np
import pytest

from conftest import CONFIGS
from r1jax.config import load_config
from r1jax.data.pipeline import GlobalBatchLoader, make_source, tokenizer_corpus
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
