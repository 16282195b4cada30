"""Accuracy reward (R1 section 2.2.2): is the final answer right?

The final answer is pulled out of the completion (`extract_answer`) and compared with the record's
reference (`answers_equivalent`): normalised strings, then exact numbers, then math-verify's symbolic
equivalence for LaTeX (fractions, radicals, tuples, intervals, expressions). Procedural records use
their own exact checkers, records with "tests" run the program in the sandbox (`code.code_reward`).
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, NamedTuple

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

# --------------------------------------------------------------------------------------------------
# The explosion pre-check: expressions whose exact value the verifier cannot afford
# --------------------------------------------------------------------------------------------------

# sympy (and mpmath under its evalf) computes powers and factorials exactly, in big-integer operations
# that no alarm interrupts: comparing 10^{10^{10^{10}}} with 2^{n}, simplify's evalf turns 10^(10^10)
# into an exact integer, 4.3 GB in one call (8.5 GB seen). `explodes` bounds, without evaluating, the
# size of every power, factorial and binomial in an answer, and refuses it past these limits.
MAX_RESULT_DIGITS = 100_000  # decimal digits of any exact number an answer denotes (2^{2005}: 604)
MAX_DEGREE = 10_000  # a numeric exponent over a symbolic base (x^{n}: n; e^{n}; sums and products to n)
MAX_FACTORIAL = 20_000  # n of n! and \binom{n}{k}
MAX_NESTING = 48  # groups inside groups
PRECHECK = True  # False lets exploding answers reach the verifier (only to test the reward workers' memory cap)
_LOG2 = math.log10(2)

_TOKEN = re.compile(r"""
    (?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<cmd>\\[A-Za-z]+)
  | (?P<esc>\\.?)
  | (?P<pow>\*\*|\^)
  | (?P<ws>\s+)
  | (?P<ch>.)
""", re.VERBOSE | re.DOTALL)
_OPEN, _CLOSE = frozenset("{([") | {"\\{"}, frozenset("})]") | {"\\}"}
_SEPARATORS = frozenset(",;=<>&|:") | {"\\\\", "\\le", "\\leq", "\\ge", "\\geq", "\\ne", "\\neq", "\\approx",
                                       "\\sim", "\\equiv", "\\in", "\\notin", "\\subset", "\\subseteq", "\\cup",
                                       "\\cap", "\\to", "\\rightarrow", "\\Rightarrow", "\\implies", "\\iff",
                                       "\\mid", "\\setminus", "\\land", "\\lor", "\\wedge", "\\vee", "\\quad",
                                       "\\qquad", "\\lt", "\\gt", "\\colon"}
_ADD, _MUL = frozenset({"+", "-", "\\pm", "\\mp"}), frozenset({"*", "/", "\\cdot", "\\times", "\\div", "\\ast"})
_POSTFIX = frozenset({"!", "%", "\\%", "'", "_"})
_SKIP = frozenset({"\\left", "\\right", "\\big", "\\Big", "\\bigg", "\\Bigg", "\\bigl", "\\bigr", "\\Bigl",
                   "\\Bigr", "\\biggl", "\\biggr", "\\displaystyle", "\\textstyle", "\\limits", "\\nolimits",
                   "\\,", "\\!", "\\;", "\\:", "\\ ", "\\middle"})
_FRAC = frozenset({"\\frac", "\\dfrac", "\\tfrac", "\\cfrac"})
_CONSTANTS = frozenset({"e", "E", "\\pi"})  # numbers to sympy's evalf: e^{10^9} is evaluated, x^{10^9} is not
_EXPONENTIALS = frozenset({"\\exp", "\\cosh", "\\sinh"})  # e^{arg} in size
_BINOM = frozenset({"\\binom", "\\dbinom", "\\tbinom"})
_ONE_ARG = frozenset({"\\text", "\\textbf", "\\textit", "\\textrm", "\\mathrm", "\\mathbf", "\\mathit", "\\mathbb",
                      "\\mathcal", "\\mbox", "\\operatorname", "\\hat", "\\bar", "\\vec", "\\overline",
                      "\\underline", "\\tilde", "\\widehat", "\\overbrace", "\\underbrace"})


class _Explodes(Exception):
    """Raised inside the pre-check's parser as soon as a bound passes its limit."""


class _Size(NamedTuple):
    """What `explodes` knows of a subexpression: `digits` bounds log10 of the numerator and of the
    denominator of its exact value, symbols counting as 1 (so it also bounds the numbers inside a
    symbolic one); `symbolic`: holds a symbol; `fraction`: may not be an integer."""

    digits: float
    symbolic: bool = False
    fraction: bool = False


_ONE = _Size(0.0)
_CONSTANT = _Size(0.5, False, True)  # |e|, |pi| < 10^0.5


def _size(digits: float, symbolic: bool, fraction: bool) -> _Size:
    if _over(digits, MAX_RESULT_DIGITS):
        raise _Explodes
    return _Size(digits, symbolic, fraction)


def _bound(digits: float) -> float:
    """10 ** digits (an upper bound of the value), inf past float range."""
    return 10.0 ** digits if digits < 300 else math.inf


def _over(value: float, limit: float) -> bool:
    return value > limit * (1 + 1e-9)  # 10 ** log10(n) may round up past n


def _number(text: str) -> _Size:
    """A decimal literal (`72`, `0.50`, `6.02e23`) as a fraction: digits of its numerator and denominator."""
    mantissa, _, exponent = text.lower().partition("e")
    whole, _, decimals = mantissa.partition(".")
    digits = (whole + decimals).lstrip("0")
    magnitude = math.log10(int(digits[:16])) + max(len(digits) - 16, 0) if digits else 0.0
    shift = math.inf if len(exponent) > 15 else abs(int(exponent or 0))
    return _size(max(magnitude, len(decimals)) + shift, False, bool(decimals or exponent))


def _power(base: _Size, exponent: _Size) -> _Size:
    bound = _bound(exponent.digits)  # >= |exponent|
    symbolic = base.symbolic or exponent.symbolic
    if symbolic and _over(bound, MAX_DEGREE):
        raise _Explodes  # x^{10^9}: a polynomial of that degree; 2^{10^9 n}: (2^n)^{10^9}
    return _size(base.digits * bound if base.digits else 0.0, symbolic, True)


def _factorial(n: _Size) -> _Size:
    if n.symbolic:
        return _size(n.digits, True, n.fraction)
    bound = _bound(n.digits)
    if _over(bound, MAX_FACTORIAL):
        raise _Explodes
    return _size(bound * math.log10(max(bound, 2.0)), False, n.fraction)


def _binomial(n: _Size, k: _Size) -> _Size:
    for arg in (n, k):
        if not arg.symbolic and _over(_bound(arg.digits), MAX_FACTORIAL):
            raise _Explodes
    if n.symbolic or k.symbolic:
        return _size(n.digits + k.digits, True, False)
    return _size(_bound(n.digits) * _LOG2, False, False)  # C(n, k) <= 2^n


class _Parser:
    """Recursive descent over a LaTeX (or plain `**`) expression that computes `_Size`s, tolerant of
    whatever it does not know: an unknown command is a symbol, a stray token is skipped."""

    def __init__(self, text: str):
        self.toks = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(text)
                     if m.lastgroup != "ws" and m.group() not in _SKIP]
        self.pos, self.depth = 0, 0

    def peek(self) -> str | None:
        return self.toks[self.pos][1] if self.pos < len(self.toks) else None

    def run(self) -> None:
        while self.pos < len(self.toks):
            self.expression()
            self.pos += self.pos < len(self.toks)  # a stray closer, or a token no rule takes

    def expression(self) -> _Size:  # separators: tuples, relations, matrix cells
        node = self.sum()
        while self.peek() in _SEPARATORS:
            self.pos += 1
            other = self.sum()
            node = _size(max(node.digits, other.digits), node.symbolic or other.symbolic,
                         node.fraction or other.fraction)
        return node

    def sum(self) -> _Size:
        node = self.term()
        while self.peek() in _ADD:
            self.pos += 1
            b = self.term()
            frac = node.fraction or b.fraction
            digits = (node.digits + b.digits if frac else max(node.digits, b.digits)) + _LOG2
            node = _size(digits, node.symbolic or b.symbolic, frac)
        return node

    def term(self) -> _Size:
        node = self.unary()
        while True:
            tok = self.peek()
            if tok in _MUL:
                self.pos += 1
            elif tok is None or tok in _CLOSE or tok in _SEPARATORS or tok in _ADD or tok in _POSTFIX or \
                    self.toks[self.pos][0] == "pow":
                return node
            b = self.unary()  # an operator, or juxtaposition: 2x, 3\sqrt{2}
            node = _size(node.digits + b.digits, node.symbolic or b.symbolic, node.fraction or b.fraction
                         or tok == "/" or tok == "\\div")

    def unary(self) -> _Size:
        while self.peek() in _ADD:
            self.pos += 1
        return self.power()

    def power(self) -> _Size:
        node = self.postfix(self.atom())
        if self.pos < len(self.toks) and self.toks[self.pos][0] == "pow":
            self.pos += 1
            node = self.postfix(_power(node, self.operand()))
        return node

    def operand(self) -> _Size:
        """An exponent: `{...}` or one atom (with its sign), itself raised by a further `^`/`**`
        (read as a tower, the larger reading of `10^{10}^{10}`)."""
        while self.peek() in _ADD:
            self.pos += 1
        node = self.postfix(self.atom(), subscript_only=True)
        if self.pos < len(self.toks) and self.toks[self.pos][0] == "pow":
            self.pos += 1
            node = _power(node, self.operand())
        return node

    def postfix(self, node: _Size, subscript_only: bool = False) -> _Size:
        while True:
            tok = self.peek()
            if tok == "_":
                self.pos += 1
                self.atom()  # a name part, read only for what it holds
            elif subscript_only or tok not in _POSTFIX:
                return node
            elif tok == "!":
                self.pos += 1
                node = _factorial(node)
            else:  # %, \%, '
                self.pos += 1
                node = _size(node.digits + (2 if "%" in tok else 0), node.symbolic or tok == "'", True)

    def group(self) -> _Size:
        """The `{...}` argument of a command, or a single atom."""
        return self.atom() if self.peek() in _OPEN else self.postfix(self.atom(), subscript_only=True)

    def atom(self) -> _Size:
        tok = self.peek()
        if tok is None or tok in _CLOSE or tok in _SEPARATORS or tok in _ADD or tok in _MUL or tok in _POSTFIX:
            return _ONE
        kind = self.toks[self.pos][0]
        self.pos += 1
        if kind == "pow":
            return _ONE
        if kind == "num":
            return _number(tok)
        if tok in _OPEN:
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise _Explodes
            node = self.expression()
            self.depth -= 1
            self.pos += self.peek() in _CLOSE
            return node
        if tok in _FRAC:
            a, b = self.group(), self.group()
            return _size(a.digits + b.digits, a.symbolic or b.symbolic, True)
        if tok in _BINOM:
            return _binomial(self.group(), self.group())
        if tok == "\\sqrt":
            if self.peek() == "[":
                self.atom()
            a = self.group()
            return _size(a.digits, a.symbolic, True)
        if tok in _CONSTANTS:
            return _CONSTANT
        if tok in _EXPONENTIALS:
            return _power(_CONSTANT, self.group())
        if tok == "\\Gamma":  # Gamma(n) = (n-1)!
            return _factorial(self.group())
        if tok in ("\\begin", "\\end"):
            if self.peek() == "{":
                self.atom()
            return _Size(0.0, True)
        if tok in ("\\boxed", "\\fbox"):
            return self.group()
        if tok in _ONE_ARG:
            a = self.group()
            return _Size(a.digits, True, a.fraction)
        return _Size(0.0, True)  # a letter, a Greek letter, \pi, \infty, \sin, any other command


def explodes(text: str) -> bool:
    """True if the expression `text` (LaTeX, or plain with `**`) may denote a number too large to
    evaluate exactly: a power, factorial or binomial past MAX_RESULT_DIGITS digits (`9^{99999999}`,
    `10^{10^{10^{10}}}`, `100000!`, `1e999999`, `e^{10^9}`, `99^{10^{e^{9}}}`: e and pi are numbers,
    sympy evaluates them), a numeric exponent past MAX_DEGREE over a symbolic base (`x^{10^{10}}`,
    `\\prod_{k=1}^{10^9}`), a factorial, Gamma or binomial of more than MAX_FACTORIAL, or groups
    nested past MAX_NESTING. A bound computed from the text alone, never an
    evaluation: linear in len(text). Ordinary answers (`2^{10}`, `2^{2005}`, `\\frac{1}{2}`, `x^{2}+1`,
    `10!`, `6.02\\times10^{23}`) pass."""
    try:
        _Parser(text).run()
    except (_Explodes, ValueError, OverflowError, RecursionError):
        return True
    return False


_refused = [0]  # answers refused by the pre-check in this process (what a reward worker reports)


def refusals() -> int:
    """How many answers `answers_equivalent` has refused in this process as `explodes` (or, off the
    main thread, as a nested power the verifier could not be stopped on)."""
    return _refused[0]


def _refuse() -> bool:
    _refused[0] += 1
    return False


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
    if PRECHECK and explodes(got):
        return _refuse()
    if not _main_thread() and (_NESTED_POWER.search(got) or _NESTED_POWER.search(expected)):
        return _refuse()  # no alarm to stop sympy evaluating a tower like 10^{10^{10}}
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
