"""Accuracy reward (R1 section 2.2.2): is the final answer right?

The final answer is pulled out of the completion (`extract_answer`) and compared with the record's
reference (`answers_equivalent`): normalised strings, then exact numbers, then math-verify's symbolic
equivalence for LaTeX (fractions, radicals, tuples, intervals, expressions). Procedural records use
their own exact checkers, records with "tests" run the program in the sandbox (`code.code_reward`).
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from r1jax.data.procedural import check_arithmetic, check_countdown
from r1jax.rewards.answer import extract_answer, extract_boxed  # noqa: F401 (part of this module's API)

MAX_VERIFY_CHARS = 400  # longer answers are compared as strings only: sympy on them can run for minutes
VERIFY_TIMEOUT_S = 2  # math-verify's SIGALRM limit per parse / comparison (whole seconds)

# --------------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------------

_GROUP_COMMA = re.compile(r"\{,\}|,\\!\s*")  # 1{,}000 and 11,\! 111 (MATH digit grouping)
_LATEX_SPACES = re.compile(r"(?<!\\)\\[!,;: ]|\\q?quad\b|~")  # not the row break \\
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_DELIMS = (("\\(", "\\)"), ("\\[", "\\]"))
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def normalize_answer(text: str) -> str:
    """Cheap canonical form for string comparison: no `$`, no `\\(` `\\)`, no LaTeX spacing, `\\text{x}`
    unwrapped, `\\dfrac`/`\\tfrac` as `\\frac`, no trailing period, thousands commas removed from a
    plain number, whitespace collapsed."""
    s = _GROUP_COMMA.sub(",", text.strip())
    for left, right in _DELIMS:
        if s.startswith(left) and s.endswith(right):
            s = s[len(left):-len(right)]
    s = s.replace("$", "")
    s = _LATEX_SPACES.sub(" ", s)
    s = _TEXT_CMD.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = " ".join(s.split())
    s = s.rstrip(".").strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> Fraction | None:
    """Exact value of a plain decimal (`72`, `-0.50`, `025`), else None."""
    if len(s) > 64 or not _DECIMAL.fullmatch(s):
        return None
    return Fraction(s)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _verify_timeout() -> int | None:
    # math-verify's limits use signal.alarm, which exists only in the main thread.
    return VERIFY_TIMEOUT_S if _main_thread() else None


_NESTED_POWER = re.compile(r"\^\s*\{[^}]*\^|\^\s*\d+\s*\^|!\s*!")


def _mv_parse(text: str) -> list:
    from math_verify import parse

    return parse(f"${text}$", parsing_timeout=_verify_timeout())


@functools.lru_cache(maxsize=4096)
def _gold(text: str) -> tuple:
    return tuple(_mv_parse(text))


def _math_verify(expected: str, got: str) -> bool:
    from math_verify import verify

    if max(len(expected), len(got)) > MAX_VERIFY_CHARS:
        return False
    if not _main_thread() and (_NESTED_POWER.search(got) or _NESTED_POWER.search(expected)):
        return False  # no alarm to stop sympy evaluating a tower like 10^{10^{10}}
    gold, pred = list(_gold(expected)), _mv_parse(got)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=_verify_timeout()))


def answers_equivalent(expected: str, got: str | None) -> bool:
    """True iff the answer `got` means the reference `expected`.

    In order: equal after `normalize_answer`; equal as plain decimal numbers (`72` == `72.0`,
    `1,000` == `1000`, `025` == `25`); math-verify symbolic equivalence with the reference as gold
    (`1/2` == `\\frac{1}{2}`, `\\sqrt{2}/2` == `\\frac{\\sqrt2}{2}`). Never raises: an answer that cannot
    be parsed is simply not equivalent.
    """
    try:
        if not isinstance(expected, str) or not isinstance(got, str):
            return False
        e, g = normalize_answer(expected), normalize_answer(got)
        if not g:
            return False
        if e == g:
            return True
        ne, ng = _as_number(e), _as_number(g)
        if ne is not None and ng is not None:
            return ne == ng
        return _math_verify(e, g)
    except Exception:  # noqa: BLE001 - a reward must never raise on model text
        return False
    except BaseException as exc:  # math-verify's TimeoutException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return False


# --------------------------------------------------------------------------------------------------
# The reward
# --------------------------------------------------------------------------------------------------

def _record_kind(record: Mapping[str, Any]) -> str:
    rid = str(record.get("id", ""))
    if rid.startswith("arithmetic:"):
        return "arithmetic"
    if rid.startswith("countdown:"):
        return "countdown"
    if record.get("tests"):
        return "code"
    return "math"


def is_code_record(record: Mapping[str, Any]) -> bool:
    """A code problem: scored by running record["tests"], not by comparing answers."""
    return _record_kind(record) == "code"


def accuracy_reward(completion: str, record: Mapping[str, Any]) -> float:
    """1.0 if the completion's final answer is right for `record`, else 0.0 (R1 section 2.2.2).

    Records with an id "arithmetic:..." use `check_arithmetic`, "countdown:..." `check_countdown`
    against numbers/target; records with "tests" (code problems) score the program in the answer with
    `code.code_reward` (all tests must pass); any other record compares with record["answer"] through
    `answers_equivalent`. Never raises (0.0 on any error).
    """
    try:
        kind = _record_kind(record)
        if kind == "code":
            from r1jax.rewards.code import code_reward

            return code_reward(completion, record)
        answer = extract_answer(completion)
        if answer is None:
            return 0.0
        if kind == "arithmetic":
            ok = check_arithmetic(record, answer)
        elif kind == "countdown":
            ok = check_countdown(record["numbers"], record["target"], answer)
        else:
            ok = answers_equivalent(str(record["answer"]), answer)
        return 1.0 if ok else 0.0
    except Exception:  # noqa: BLE001
        return 0.0


def check_answer(record: Mapping[str, Any], completion: str) -> bool:
    """Is `completion` right for `record`? The accuracy reward's verdict (`accuracy_reward` > 0.5): the
    one check held-out evaluation, sampled evaluation and rejection sampling share with GRPO."""
    return accuracy_reward(completion, record) > 0.5
