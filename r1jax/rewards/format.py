"""Format reward (R1 section 2.2.2): the thinking goes between <think> and </think>, the answer
between <answer> and </answer>, in the layout of the chat template (r1jax.tokenizer.TEMPLATES):

  r1_zero  the prompt ends right before " <think>", so a well-formed completion is exactly
           `<think> ... </think> <answer> ... </answer>` (whitespace around and between the parts);
  r1       `<think> ... </think>` then a readable summary that holds `<answer> ... </answer>`
           (R1's cold-start layout), optionally closed by punctuation.
"""

from __future__ import annotations

import re

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_SHAPES = {
    "r1_zero": re.compile(r"\s*<think>(.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL),
    "r1": re.compile(r"\s*<think>(.*?)</think>(.*?)<answer>(?P<answer>.*?)</answer>[\s.!]*", re.DOTALL),
}


def format_reward(completion: str, template: str = "r1_zero") -> float:
    """1.0 iff `completion` has `template`'s layout (module docstring): each tag exactly once, in
    order, a non-blank answer, nothing after </answer> but whitespace (r1: and closing punctuation).
    The thinking may be empty. Else 0.0; never raises (an unknown template scores 0.0)."""
    if not isinstance(completion, str) or template not in _SHAPES:
        return 0.0
    if any(completion.count(tag) != 1 for tag in _TAGS):
        return 0.0
    match = _SHAPES[template].fullmatch(completion)
    return 1.0 if match is not None and match.group("answer").strip() else 0.0
