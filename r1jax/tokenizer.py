"""Tokenizers and the R1 chat templates.

`Tokenizer` is one interface over two backends:

  sentencepiece  `tokenizer.model`, trained here by `Tokenizer.train_sentencepiece` for models
                 trained from scratch (pad=0, unk=1, bos=2, eos=3, digits split, byte fallback).
  HF tokenizers  `tokenizer.json` (+ `tokenizer_config.json` for bos/eos/pad) of an imported
                 checkpoint: DeepSeek-R1, Qwen2.5, Llama 3.

Either way `<think>`, `</think>`, `<answer>`, `</answer>` are single ids: user-defined symbols in a
trained sentencepiece model, added special tokens in a tokenizer.json that lacks them.

A tokenizer travels as bytes: `files()` gives everything needed to rebuild it, `from_files` rebuilds
it without the original paths, and pickling goes through the two (grain workers pickle transforms).

Templates (`render_prompt`, `render_completion`, `encode_example`) are pure functions. A training
example is `[bos] + prompt + completion + [eos]`, prompt and completion encoded separately so the loss
mask starts exactly at the completion; decoding it with `skip_special=True` gives the rendered text
back character for character (for HF, exactly so for byte-level BPE tokenizers such as those above).
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
import tokenizers

from r1jax.config import ConfigError
from r1jax.errors import DataError

THINK_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
# End-of-sequence strings tried when a tokenizer.json comes without tokenizer_config.json.
_EOS_GUESSES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")


def _not_a_tokenizer(where: str) -> DataError:
    return DataError(f"tokenizer: {where}: not a sentencepiece model or tokenizer.json")


class _SentencePiece:
    """Backend over a serialized sentencepiece ModelProto."""

    def __init__(self, model: bytes, where: str):
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model)
        except RuntimeError:  # sentencepiece's error for a proto that does not parse
            raise _not_a_tokenizer(where) from None
        self._model = model

    def special_ids(self) -> tuple[int | None, int | None, int | None, int | None]:
        """(pad, unk, bos, eos); None where the model disables one (sentencepiece says -1)."""
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        return tuple(None if i < 0 else i for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def piece_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)  # unknown pieces map to unk
        return i if self._sp.id_to_piece(i) == piece else None

    def files(self) -> dict[str, bytes]:
        return {SP_FILE: self._model}


def _config_token(config: dict, key: str) -> str | None:
    """A token string from tokenizer_config.json: a string, a {"content": ...} dict, or absent."""
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class _HuggingFace:
    """Backend over an HF tokenizer.json; adds the think/answer tokens it lacks (`self.added`)."""

    def __init__(self, data: bytes, config: bytes | None, where: str):
        try:
            self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception:  # tokenizers raises a bare Exception on malformed JSON or schema
            raise _not_a_tokenizer(where) from None
        try:
            self._config = json.loads(config) if config is not None else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"tokenizer: {where}: {HF_CONFIG} beside it is not valid JSON") from None
        self._where, self._data, self._config_bytes = where, data, config
        self.added = self._add_think_tokens()
        # Max id + 1, not a count: added tokens may leave holes in the id range.
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

    def _add_think_tokens(self) -> tuple[str, ...]:
        # A string in the BPE vocab but not an added token is not atomic: the pre-tokenizer splits
        # "<think>" into "<", "think", ">" before BPE sees it. So only added tokens count.
        present = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        missing = [t for t in THINK_TOKENS if t not in present]
        self._tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
        return tuple(missing)

    def _token_id(self, key: str, guesses: Sequence[str] = ()) -> int | None:
        token = _config_token(self._config, key)
        if token is None:
            found = (self._tok.token_to_id(g) for g in guesses)
            return next((i for i in found if i is not None), None)
        i = self._tok.token_to_id(token)
        if i is None:
            raise DataError(f"tokenizer: {self._where}: {key} {token!r} is not in the vocabulary")
        return i

    def special_ids(self) -> tuple[int | None, int | None, int | None, int | None]:
        """(pad, unk, bos, eos) from tokenizer_config.json; None where it names none."""
        guesses = _EOS_GUESSES if self._config_bytes is None else ()
        eos = self._token_id("eos_token", guesses)
        return self._token_id("pad_token"), self._token_id("unk_token"), self._token_id("bos_token"), eos

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no post-processor bos (Llama 3, DeepSeek); callers add their own.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(i)

    def piece_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def files(self) -> dict[str, bytes]:
        data = self._tok.to_str().encode("utf-8") if self.added else self._data
        out = {HF_FILE: data}
        if self._config_bytes is not None:
            out[HF_CONFIG] = self._config_bytes
        return out


class Tokenizer:
    """Text <-> token ids over a sentencepiece model or an HF tokenizer.json.

    Attributes: `pad_id`, `eos_id` (ints; pad falls back to eos when the tokenizer defines no pad),
    `bos_id`, `unk_id` (int or None), `added_specials` (think/answer tokens this load added to a
    tokenizer.json; they are part of `files()` from then on).
    """

    def __init__(self, backend: _SentencePiece | _HuggingFace, where: str):
        self._backend = backend
        pad, unk, bos, eos = backend.special_ids()
        if eos is None:
            raise DataError(f"tokenizer: {where}: no end-of-sequence token")
        self.pad_id: int = eos if pad is None else pad
        self.unk_id: int | None = unk
        self.bos_id: int | None = bos
        self.eos_id: int = eos
        self.added_specials: tuple[str, ...] = getattr(backend, "added", ())

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def train_sentencepiece(
        cls,
        texts: Iterable[str],
        out_dir: str | Path,
        vocab_size: int,
        *,
        model_type: str = "bpe",
        split_digits: bool = True,
        byte_fallback: bool = True,
        seed: int = 0,
        character_coverage: float = 1.0,
    ) -> Tokenizer:
        """Train a sentencepiece model on `texts`, write `out_dir/tokenizer.model`, return it.

        Ids: pad=0, unk=1, bos=2, eos=3, then the four think/answer tokens. With byte_fallback the
        256 byte pieces count towards `vocab_size`. Same inputs give a byte-identical model.
        Refuses to overwrite an existing tokenizer.model, and `texts` with no text at all.
        """
        path = Path(out_dir) / SP_FILE
        if path.exists():
            raise DataError(f"tokenizer: {path}: already exists; refusing to overwrite")
        texts = (t for t in texts if t)
        first = next(texts, None)
        if first is None:
            raise DataError("tokenizer: no text to train a tokenizer on (the training data is empty)")
        buf = io.BytesIO()
        # sentencepiece's only seed is process-global; unigram training samples with it.
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=itertools.chain([first], texts),
                model_writer=buf,
                vocab_size=vocab_size,
                model_type=model_type,
                split_digits=split_digits,
                byte_fallback=byte_fallback,
                character_coverage=character_coverage,
                pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                user_defined_symbols=list(THINK_TOKENS),
                num_threads=1,  # multi-threaded counting can order ties differently
                # Exact round trips, needed for exact loss masks: decode(encode(s)) == s for any s.
                # The defaults break it three ways. add_dummy_prefix prepends "▁" to every encode(),
                # so encoding prompt and completion apart would insert a space between them; the
                # default nmt_nfkc normalisation rewrites text (full-width forms, ligatures); and
                # remove_extra_whitespaces strips leading/trailing spaces and collapses runs, which
                # would eat the space that opens the r1_zero completion " <think>".
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                normalization_rule_name="identity",
                max_sentence_length=1 << 16,  # reasoning traces are long; longer ones are skipped
                minloglevel=2,
            )
        except RuntimeError as e:
            raise DataError(f"tokenizer: sentencepiece training failed: {str(e).splitlines()[0]}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
        return cls._build({SP_FILE: buf.getvalue()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a `.model` file, a `tokenizer.json`, or a directory with one (tokenizer.model first).

        A tokenizer_config.json beside a tokenizer.json supplies its bos/eos/pad tokens.
        """
        path = Path(path)
        if not path.exists():
            raise DataError(f"tokenizer: {path}: not found")
        if path.is_dir():
            path = next((path / f for f in (SP_FILE, HF_FILE) if (path / f).is_file()), path)
            if path.is_dir():
                raise DataError(f"tokenizer: {path}: no {SP_FILE} or {HF_FILE} in this directory")
        if path.suffix == ".json":
            files = {HF_FILE: _read(path)}
            if (path.parent / HF_CONFIG).is_file():
                files[HF_CONFIG] = _read(path.parent / HF_CONFIG)
        else:
            files = {SP_FILE: _read(path)}
        return cls._build(files, str(path))

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> Tokenizer:
        """Rebuild a tokenizer from the name -> bytes mapping that `files()` returned."""
        return cls._build(files, "<files>")

    @classmethod
    def _build(cls, files: dict[str, bytes], where: str) -> Tokenizer:
        if SP_FILE in files:
            return cls(_SentencePiece(files[SP_FILE], where), where)
        if HF_FILE in files:
            return cls(_HuggingFace(files[HF_FILE], files.get(HF_CONFIG), where), where)
        raise DataError(f"tokenizer: {where}: no {SP_FILE} or {HF_FILE} among {sorted(files)}")

    def files(self) -> dict[str, bytes]:
        """File name -> content of everything needed to rebuild this tokenizer (`from_files`)."""
        return self._backend.files()

    def __getstate__(self) -> dict:
        return {"files": self.files(), "added_specials": self.added_specials}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(Tokenizer.from_files(state["files"]).__dict__)
        self.added_specials = tuple(state["added_specials"])

    # ---- use ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Ids run 0..vocab_size-1 (HF: including added tokens)."""
        return self._backend.vocab_size

    def special_id(self, token: str) -> int:
        """The single id of `token` (e.g. "<think>"); DataError if it is not one piece."""
        i = self._backend.piece_id(token)
        if i is None:
            raise DataError(f"tokenizer: {token!r} is not a single token in this vocabulary")
        return i

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; bos is skipped when the tokenizer has none (Qwen2.5)."""
        ids = self._backend.encode(text)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return [*ids, self.eos_id] if add_eos else ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`. skip_special drops pad/bos/eos but keeps the think/answer tokens. Ids outside
        the vocabulary (a model's padded vocab rows) decode to nothing."""
        n = self.vocab_size
        ids = [int(i) for i in ids if 0 <= int(i) < n]
        if skip_special:
            drop = {self.pad_id, self.bos_id, self.eos_id}
            ids = [i for i in ids if i not in drop]
        return self._backend.decode(ids)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary string of id `i` (sentencepiece "▁x", byte-level BPE "Ġx")."""
        return self._backend.id_to_piece(int(i))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"tokenizer: {path}: cannot read ({e.strerror})") from None


# --------------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------------

_R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: {question}. Assistant:"
)

# name -> (prompt, completion). r1_zero: DeepSeek-R1 paper, Table 1. r1: reasoning, then a summary.
_TEMPLATES = {
    "r1_zero": (_R1_ZERO_PROMPT, " <think> {reasoning} </think> <answer> {answer} </answer>"),
    "r1": (
        "User: {question}\nAssistant: ",
        "<think>\n{reasoning}\n</think>\nThe answer is <answer> {answer} </answer>.",
    ),
}
TEMPLATES = tuple(_TEMPLATES)


def _template(name: str) -> tuple[str, str]:
    if name not in _TEMPLATES:
        raise ConfigError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    return _TEMPLATES[name]


def render_prompt(template: str, question: str) -> str:
    """The prompt text of `template` around `question`; generation continues from its end."""
    return _template(template)[0].format(question=question)


def render_completion(template: str, reasoning: str, answer: str) -> str:
    """The completion text of `template`: reasoning in <think>, answer in <answer>."""
    return _template(template)[1].format(reasoning=reasoning, answer=answer)


def encode_prompt(tok: Tokenizer, template: str, question: str, *, add_bos: bool = True) -> np.ndarray:
    """int32 [n] ids of [bos] + prompt, for generation."""
    return np.asarray(tok.encode(render_prompt(template, question), add_bos=add_bos), np.int32)


def encode_example(
    tok: Tokenizer, template: str, question: str, reasoning: str, answer: str, *, add_bos: bool = True,
    completion_text: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A supervised example: (ids int32 [n], loss_mask bool [n]).

    ids = [bos] + prompt + completion + [eos]; loss_mask is True on the completion and the eos,
    False on bos and prompt. bos is left out when `add_bos` is False or the tokenizer has none.
    The completion is the template's rendering of reasoning and answer, or `completion_text` as it
    is (a general prompt's free-form demonstration, which has no <answer>).
    """
    prompt = encode_prompt(tok, template, question, add_bos=add_bos)  # [n_prompt]
    text = render_completion(template, reasoning, answer) if completion_text is None else completion_text
    completion = tok.encode(text, add_eos=True)
    ids = np.concatenate([prompt, np.asarray(completion, np.int32)])  # [n]
    loss_mask = np.arange(len(ids)) >= len(prompt)  # [n]
    return ids, loss_mask
