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
_SPACES = re.compile(" *")
_BARE_ARG = re.compile(r"[^\s$]*")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character (`\{` too) or a brace
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


def _group_ends(text: str, starts: set[int]) -> dict[int, int]:
    """{i: j} for each i of `starts` (text[i] == "{") whose brace group closes, at text[j] == "}".

    Braces balance as a left-to-right scan from i counts them, `\\{` and `\\}` (any backslash and the
    character after it) being literal characters. One pass over the text for all of them: the group
    opened at depth d closes at the first "}" after it that brings the depth back to d. Linear in
    len(text), however many starts and however deep the nesting."""
    ends: dict[int, int] = {}
    waiting: dict[int, int] = {}  # depth -> the start opened at that depth, not yet closed
    depth = 0
    for m in _BRACE_TOKEN.finditer(text, min(starts)):
        ch = m.group()
        if ch == "{":
            if m.start() in starts:
                waiting[depth] = m.start()
            depth += 1
        elif ch == "}":
            depth -= 1
            start = waiting.pop(depth, None)
            if start is not None:
                ends[start] = m.start()
    return ends


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` (nested braces balanced), or of
    `\\boxed 5` (argument up to the next space or `$`); None if there is none. Linear in len(text)."""
    args = [_SPACES.match(text, m.end()).end() for m in _BOX_CMD.finditer(text)]  # where each argument starts
    starts = {i for i in args if text.startswith("{", i)}
    ends = _group_ends(text, starts) if starts else {}
    for i in reversed(args):
        if i in starts:
            inner = text[i + 1:ends[i]] if i in ends else None
        else:
            inner = _BARE_ARG.match(text, i).group(0) or None
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
