"""Language-consistency reward (R1 section 2.3.2): "the proportion of target language words in the
CoT", added to keep the reasoning from mixing languages.

Words are runs of letters/digits; CJK ideographs and kana count one word per character (Chinese and
Japanese are written without spaces). A word with no letter (numbers, operators, LaTeX punctuation) or
that is a single Greek letter (a math variable) is neutral: it counts neither way.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK = re.compile(f"[{_CJK_RANGES}]")
_WORD = re.compile(rf"[{_CJK_RANGES}]|[^\s{_CJK_RANGES}]+")
_THINK = re.compile(r"<think>(.*?)(?:</think>|\Z)", re.DOTALL)


def _is_ascii_word(word: str) -> bool:
    return all(ch.isascii() for ch in word if ch.isalpha())


def _has_cjk(word: str) -> bool:
    return _CJK.search(word) is not None


# target language -> "is this (lettered) word written in it?". Add a language with one entry.
LANGUAGE_PREDICATES: dict[str, Callable[[str], bool]] = {
    "en": _is_ascii_word,
    "zh": _has_cjk,
}


def _neutral(word: str) -> bool:
    letters = [ch for ch in word if ch.isalpha()]
    if not letters:
        return True
    return len(letters) == 1 and "\u0370" <= letters[0] <= "\u03ff" and not _CJK.search(word)


def reasoning_text(completion: str) -> str:
    """The chain of thought: the first <think> block (to the end if it never closes), else all text."""
    match = _THINK.search(completion)
    return match.group(1) if match else completion


def language_consistency(completion: str, target: str = "en") -> float:
    """Share in [0, 1] of the lettered words of the chain of thought that are in `target` (a key of
    LANGUAGE_PREDICATES); 1.0 if it has no lettered word. ValueError for an unknown target."""
    if target not in LANGUAGE_PREDICATES:
        raise ValueError(f"unknown target language {target!r}; known: {', '.join(LANGUAGE_PREDICATES)}")
    if not isinstance(completion, str):
        return 0.0
    in_target = LANGUAGE_PREDICATES[target]
    counted = hits = 0
    for word in _WORD.findall(reasoning_text(completion)):
        if _neutral(word):
            continue
        counted += 1
        hits += in_target(word)
    return hits / counted if counted else 1.0
