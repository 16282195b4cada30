"""Where a completion states its answer: the one `<answer>` parser and the one `extract_answer`.

Every part of r1jax that reads an answer out of model text goes through here: the accuracy reward,
the code reward (the program in the answer), rejection sampling (the answer it keeps), held-out and
sampled evaluation (the answer a sample votes for).
"""

from __future__ import annotations

import re
from typing import NamedTuple

OPEN, CLOSE = "<answer>", "</answer>"
_BOX_CMD = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")


class AnswerTag(NamedTuple):
    start: int  # index of the opening `<answer>`
    content: str  # the text between the tags, verbatim


def answer_tag(text: str) -> AnswerTag | None:
    """The last complete `<answer>...</answer>` of `text`, None if there is none.

    Tags pair as a left-to-right scan pairs them: each `<answer>` with the first `</answer>` after
    it, the next pair starting after that (so "<answer>a<answer>b</answer>" holds one tag, "a<answer>b").
    Linear in len(text), whatever the text holds.
    """
    if not isinstance(text, str):
        return None
    last, pos = None, 0
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            return last
        end = text.find(CLOSE, start + len(OPEN))
        if end < 0:  # no later opening tag can close either
            return last
        last = AnswerTag(start, text[start + len(OPEN):end])
        pos = end + len(CLOSE)


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] == "{", braces balanced; `\\{` and `\\}` are
    literal characters, not grouping. None if the group never closes."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` (nested braces balanced), or of
    `\\boxed 5` (argument up to the next space or `$`); None if there is none."""
    for match in reversed(list(_BOX_CMD.finditer(text))):
        i = match.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            inner = _braced(text, i)
        else:
            inner = re.match(r"[^\s$]*", text[i:]).group(0) or None
        if inner is not None:
            return inner.strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, stripped; None if it states none.

    Priority: the last `<answer>...</answer>` (`answer_tag`; if that contains `\\boxed{}`, the boxed
    part), else the last `\\boxed{}`/`\\fbox{}`, else the last GSM8K-style `#### <answer>` line.
    """
    if not isinstance(text, str):
        return None
    tag = answer_tag(text)
    if tag is not None:
        boxed = extract_boxed(tag.content)
        return boxed if boxed is not None else tag.content.strip()
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    hashes = _HASHES.findall(text)
    return hashes[-1].strip() if hashes else None
