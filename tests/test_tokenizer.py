"""Tokenizer backends (trained sentencepiece, HF tokenizer.json), chat templates, loss masks."""

import json
import pickle
import random

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from r1jax.config import ConfigError
from r1jax.errors import DataError
from r1jax.tokenizer import (
    TEMPLATES,
    THINK_TOKENS,
    Tokenizer,
    encode_example,
    encode_prompt,
    render_completion,
    render_prompt,
)

ROUND_TRIP = [
    "",
    "hello world",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\n\n",
    "punctuation: (a+b)*c = d; e! f? 'g' \"h\" [i] {j}",
    "unicode: héllo 日本語 ☃ 🚀",
    "<think> x </think><answer>42</answer>",
    "12345 + 678 = 13023",
]

EXAMPLE = ("What is 17 * 23?", "17 * 20 = 340 and 17 * 3 = 51,\nso 340 + 51 = 391.", "391")


def corpus(n=300, seed=0):
    """Arithmetic sentences plus some English; many repeats of 12345 so BPE would merge it."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        texts.append(f"What is {a} + {b}? The answer is {a + b}.")
        texts.append(f"{a} * {b} = {a * b}\nso the result is {a * b}")
    texts += ["The quick brown fox jumps over the lazy dog.", "User: hello there! Assistant: hi, 12345."] * 20
    return texts


def train(out_dir, **kw):
    return Tokenizer.train_sentencepiece(corpus(), out_dir, 400, **kw)


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return train(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json with <s>, </s> and <think> already special, plus its config."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350, special_tokens=["<s>", "</s>", "<think>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    d = tmp_path_factory.mktemp("hf")
    tok.save(str(d / "tokenizer.json"))
    config = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return Tokenizer.load(hf_dir)


@pytest.fixture(params=["sp", "hf"])
def tok(request, sp_tok, hf_tok):
    return {"sp": sp_tok, "hf": hf_tok}[request.param]


# ---- sentencepiece ---------------------------------------------------------------------------------


def test_sentencepiece_ids_and_specials(sp_tok):
    assert (sp_tok.pad_id, sp_tok.unk_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 1, 2, 3)
    assert sp_tok.vocab_size == 400
    assert [sp_tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    for t in THINK_TOKENS:
        i = sp_tok.special_id(t)
        assert sp_tok.encode(t) == [i]
        assert sp_tok.id_to_piece(i) == t
        assert sp_tok.decode([i]) == t


def test_sentencepiece_splits_digits(sp_tok, tmp_path):
    assert [sp_tok.id_to_piece(i) for i in sp_tok.encode("12345")] == list("12345")
    pieces = [sp_tok.id_to_piece(i) for i in sp_tok.encode("x 907")]
    assert [p for p in pieces if p.strip("▁x")] == ["9", "0", "7"]
    # The option reaches the trainer: without it the frequent "12345" merges.
    merged = train(tmp_path, split_digits=False)
    assert len(merged.encode("12345")) < 5


def test_sentencepiece_byte_fallback(sp_tok):
    pieces = [sp_tok.id_to_piece(i) for i in sp_tok.encode("🚀")]
    assert pieces == ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]
    assert sp_tok.unk_id not in sp_tok.encode("unicode: héllo 日本語 ☃ 🚀")


def test_sentencepiece_training_is_deterministic(sp_tok, tmp_path):
    again = train(tmp_path / "again")
    assert again.files() == sp_tok.files()
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == sp_tok.files()["tokenizer.model"]


def test_train_refuses_to_overwrite(tmp_path):
    train(tmp_path)
    with pytest.raises(DataError, match="already exists"):
        train(tmp_path)


# ---- HF tokenizer.json -----------------------------------------------------------------------------


def test_hf_specials_added(hf_dir, hf_tok):
    base = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    n_base = base.get_vocab_size(with_added_tokens=True)
    assert hf_tok.added_specials == ("</think>", "<answer>", "</answer>")
    assert hf_tok.special_id("<think>") == base.token_to_id("<think>")  # already there: kept
    assert sorted(hf_tok.special_id(t) for t in hf_tok.added_specials) == [n_base, n_base + 1, n_base + 2]
    assert hf_tok.vocab_size == n_base + 3
    for t in THINK_TOKENS:
        assert hf_tok.encode(f"a{t}b")[1:2] == [hf_tok.special_id(t)]
        assert hf_tok.decode([hf_tok.special_id(t)]) == t
    assert hf_tok.bos_id == base.token_to_id("<s>")  # config gives it as {"content": ...}
    assert hf_tok.eos_id == base.token_to_id("</s>")
    assert hf_tok.pad_id == hf_tok.eos_id  # no pad_token: falls back to eos
    assert hf_tok.unk_id is None
    # files() carries the added tokens: the written tokenizer.json has them, nothing to add again.
    saved = tokenizers.Tokenizer.from_str(hf_tok.files()["tokenizer.json"].decode())
    assert [saved.token_to_id(t) for t in THINK_TOKENS] == [hf_tok.special_id(t) for t in THINK_TOKENS]
    assert Tokenizer.from_files(hf_tok.files()).added_specials == ()
    assert hf_tok.files()["tokenizer_config.json"] == (hf_dir / "tokenizer_config.json").read_bytes()


def test_hf_load_file_and_dir_agree(hf_dir, hf_tok):
    direct = Tokenizer.load(hf_dir / "tokenizer.json")
    assert direct.files() == hf_tok.files()
    assert direct.bos_id == hf_tok.bos_id


def test_hf_without_config_guesses_eos(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    tok = Tokenizer.load(tmp_path)
    assert tok.id_to_piece(tok.eos_id) == "</s>"
    assert tok.bos_id is None
    assert tok.encode("hi", add_bos=True, add_eos=True)[-1] == tok.eos_id


def test_hf_config_naming_unknown_token(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(DataError, match="nope"):
        Tokenizer.load(tmp_path)


# ---- both backends ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_bos_eos_and_skip_special(tok):
    ids = tok.encode("<think> 7 </think>", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    padded = [*ids, tok.pad_id, tok.pad_id]
    assert tok.decode(padded, skip_special=True) == "<think> 7 </think>"
    assert "<think>" in tok.decode(padded)


@pytest.mark.parametrize("template", TEMPLATES)
def test_encode_example_mask(tok, template):
    question, reasoning, answer = EXAMPLE
    prompt, completion = render_prompt(template, question), render_completion(template, reasoning, answer)
    ids, mask = encode_example(tok, template, question, reasoning, answer)
    assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape
    assert ids[0] == tok.bos_id and not mask[0]
    assert ids[-1] == tok.eos_id and mask[-1]
    assert tok.decode(ids, skip_special=True) == prompt + completion
    assert tok.decode(ids[mask], skip_special=True) == completion
    assert tok.decode(ids[~mask][1:]) == prompt
    assert tok.decode(ids[mask][:-1]) == completion
    for t in THINK_TOKENS[::2]:  # opening tags: once in the completion, none in the r1 prompt
        assert list(ids[mask]).count(tok.special_id(t)) == 1
    assert np.array_equal(encode_prompt(tok, template, question), ids[~mask])


def test_encode_example_without_bos(tok):
    ids, mask = encode_example(tok, "r1", *EXAMPLE, add_bos=False)
    assert ids[0] != tok.bos_id and not mask[0]
    assert tok.decode(ids, skip_special=True) == render_prompt("r1", EXAMPLE[0]) + render_completion("r1", *EXAMPLE[1:])


def test_files_and_pickle_round_trip(tok):
    texts = [*ROUND_TRIP, render_prompt("r1_zero", "2+2") + render_completion("r1_zero", "4", "4")]
    for copy in (Tokenizer.from_files(tok.files()), pickle.loads(pickle.dumps(tok))):
        assert [copy.encode(t) for t in texts] == [tok.encode(t) for t in texts]
        assert copy.files() == tok.files()
        assert (copy.pad_id, copy.unk_id, copy.bos_id, copy.eos_id) == (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id)
        assert copy.vocab_size == tok.vocab_size
        assert [copy.special_id(t) for t in THINK_TOKENS] == [tok.special_id(t) for t in THINK_TOKENS]
    assert pickle.loads(pickle.dumps(tok)).added_specials == tok.added_specials


def test_special_id_of_absent_token(tok):
    with pytest.raises(DataError, match="<nothing>"):
        tok.special_id("<nothing>")


# ---- templates and errors --------------------------------------------------------------------------


def test_templates_text():
    assert render_prompt("r1_zero", "What is 2+2?") == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with "
        "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
        "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
        "</answer>. User: What is 2+2?. Assistant:"
    )
    assert render_completion("r1_zero", "r {x}", "4") == " <think> r {x} </think> <answer> 4 </answer>"
    assert render_prompt("r1", "Q") == "User: Q\nAssistant: "
    assert render_completion("r1", "r", "4") == "<think>\nr\n</think>\nThe answer is <answer> 4 </answer>."


def test_unknown_template():
    with pytest.raises(ConfigError, match="r1_zero, r1"):
        render_prompt("chatml", "Q")


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'missing'}: not found"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(DataError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer.load(tmp_path)
    for name in ("tokenizer.model", "tokenizer.json"):
        bad = tmp_path / name
        bad.write_bytes(b"\x00garbage{")
        with pytest.raises(DataError, match=f"{bad}: not a sentencepiece model or tokenizer.json"):
            Tokenizer.load(bad)
        bad.unlink()


def test_load_prefers_sentencepiece(sp_tok, hf_dir, tmp_path):
    for name, data in sp_tok.files().items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    assert Tokenizer.load(tmp_path).files() == sp_tok.files()


@pytest.mark.parametrize("texts", [[], ["", ""]])
def test_train_on_no_text_is_one_line_before_sentencepiece(tmp_path, texts):
    with pytest.raises(DataError) as e:
        Tokenizer.train_sentencepiece(iter(texts), tmp_path, 300)
    assert str(e.value) == "tokenizer: no text to train a tokenizer on (the training data is empty)"
    assert not (tmp_path / "tokenizer.model").exists()
