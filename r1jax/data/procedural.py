"""Verifiable tasks generated from a seed: unlimited training data with exact answers.

Each task is a grain random-access source (`len`, `task[i] -> dict`, picklable). Record i is a pure
function of (seed, split, i): attempt 0, 1, ... draws a candidate from
`numpy.random.default_rng([task tag, seed, split, i, attempt])` and keeps the first one that belongs
to the split. A problem's split is fixed by a SHA-256 bucket of its canonical key (`split_of`), so the
train and test splits are disjoint by construction, whatever seed or size either side uses.

Records: {"id", "question", "reasoning", "answer"} (all str) plus task extras, all JSON-serialisable.

The verifiers `check_arithmetic` and `check_countdown` are reward functions: they take arbitrary
model text and return a bool, never raising.
"""

from __future__ import annotations

import hashlib
import operator
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

SPLITS = ("train", "test")
TEST_PER_MILLE = 100  # ~10% of all problems belong to the test split
MAX_EXPR_CHARS = 200  # longer countdown answers are rejected unread
_MAX_ATTEMPTS = 10_000
_ARITHMETIC_TAG, _COUNTDOWN_TAG, _FLAW_TAG = 1, 2, 3


def split_of(key: str) -> str:
    """'test' for ~TEST_PER_MILLE/1000 of all keys, else 'train'; stable across runs and machines."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return "test" if h % 1000 < TEST_PER_MILLE else "train"


def _check_common(seed: int, split: str, size: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not (isinstance(size, int) and size >= 0):
        raise ValueError(f"size must be an int >= 0, got {size!r}")


def _index(i: int, size: int) -> int:
    i = operator.index(i)
    if not -size <= i < size:
        raise IndexError(f"index {i} out of range for a task of size {size}")
    return i % size


def _draw(tag: int, seed: int, split: str, i: int, propose: Callable) -> dict[str, Any]:
    """First candidate `propose(rng) -> (key, record) | None` whose key falls in `split`."""
    for attempt in range(_MAX_ATTEMPTS):
        rng = np.random.default_rng([tag, seed, SPLITS.index(split), i, attempt])
        candidate = propose(rng)
        if candidate is not None and split_of(candidate[0]) == split:
            return candidate[1]
    raise RuntimeError(f"no {split} problem found in {_MAX_ATTEMPTS} attempts; widen the task settings")


# --------------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------------


def _column_step(terms: Sequence[int], total: int, last: bool) -> str:
    """One column: '4+8+1=13, write 3 carry 1.'; the last column writes its whole value."""
    head = f"{'+'.join(map(str, terms))}={total}, write "
    if last:
        return head + f"{total}."
    carry, digit = divmod(total, 10)
    return head + (f"{digit} carry {carry}." if carry else f"{digit}.")


def _addition_steps(addends: Sequence[int], drop_carry: bool = False) -> tuple[list[str], int]:
    """Column-wise sum of non-negative addends, zero-padded to one width, least significant first.
    Returns (steps, the sum the steps arrive at). drop_carry: the first carry is announced but then
    forgotten by the next column (a deliberate slip; the steps stay consistent with it)."""
    width = max(len(str(x)) for x in addends)
    columns = [str(x).zfill(width)[::-1] for x in addends]
    steps, carry, digits = [], 0, []
    for k in range(width):
        terms = [int(c[k]) for c in columns] + ([carry] if carry else [])
        total = sum(terms)
        last = k == width - 1
        steps.append(_column_step(terms, total, last=last))
        digits.append(str(total) if last else str(total % 10))
        carry = total // 10
        if carry and drop_carry and not last:
            carry, drop_carry = 0, False
    return steps, int("".join(reversed(digits)))


def _subtraction_steps(a: int, b: int) -> list[str]:
    """Column-wise a - b for a >= b >= 0: '7-2=5, write 5.' or, borrowing, '14-8-1=5, write 5 borrow 1.'"""
    width = len(str(a))
    top, bottom = str(a)[::-1], str(b).zfill(width)[::-1]
    steps, borrow = [], 0
    for k in range(width):
        x, y = int(top[k]), int(bottom[k])
        rest = f"-{y}" + ("-1" if borrow else "")
        t = x - y - borrow
        if t >= 0:
            steps.append(f"{x}{rest}={t}, write {t}.")
            borrow = 0
        else:
            steps.append(f"{x + 10}{rest}={t + 10}, write {t + 10} borrow 1.")
            borrow = 1
    return steps


def _multiplication_steps(a: int, b: int) -> list[str]:
    """One partial product per digit of b (least significant first), then their column-wise sum."""
    steps, partials = [], []
    digits_a = [int(c) for c in str(a)[::-1]]
    for shift, ch in enumerate(str(b)[::-1]):
        d, carry = int(ch), 0
        steps.append(f"{a}*{d}:")
        for k, x in enumerate(digits_a):
            total = x * d + carry
            term = f"{x}*{d}" + (f"+{carry}" if carry else "")
            if k == len(digits_a) - 1:
                steps.append(f"{term}={total}, write {total}.")
            else:
                carry, digit = divmod(total, 10)
                steps.append(f"{term}={total}, write {digit}" + (f" carry {carry}." if carry else "."))
        partial = a * d * 10**shift
        steps.append(f"{a}*{d}={a * d}" + (f", shifted {partial}." if shift else "."))
        partials.append(partial)
    if len(partials) > 1:
        steps.append(f"Add {'+'.join(map(str, partials))}:")
        steps += _addition_steps(partials)[0]
    return steps


def flawed_addition(a: int, b: int) -> tuple[str, int] | None:
    """Worked steps for `a + b` by a demonstrator that forgets the first carry (the column after it
    adds without the 1), ending in the sum those steps arrive at: (reasoning, wrong sum); None when
    the sum has no carry to forget."""
    steps, total = _addition_steps([a, b], drop_carry=True)
    if total == a + b:
        return None
    return " ".join(steps + [f"So {a}+{b}={total}."]), total


def arithmetic_reasoning(a: int, op: str, b: int) -> str:
    """Worked steps for `a op b` (a, b >= 0), ending 'So {a}{op}{b}={result}.'; see ArithmeticTask."""
    if op == "+":
        steps = _addition_steps([a, b])[0]
    elif op == "-" and a >= b:
        steps = _subtraction_steps(a, b)
    elif op == "-":
        steps = [f"{a}<{b}, so {a}-{b}=-({b}-{a})."] + _subtraction_steps(b, a)
    elif op == "*":
        steps = _multiplication_steps(a, b)
    else:
        raise ValueError(f"op must be one of + - *, got {op!r}")
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return " ".join(steps + [f"So {a}{op}{b}={result}."])


class ArithmeticTask:
    """Multi-digit `a op b` with worked, column-by-column steps a small model can imitate.

    Operands have between `min_digits` and `max_digits` digits (count drawn uniformly, then the value
    uniformly among numbers of that length; 1-digit numbers include 0); `op` uniformly from `ops`.

    question: "What is 347 + 589?"   answer: "936" (exact integer; "-242" for 347 - 589)
    reasoning, tokens joined by single spaces, columns least significant first:
      +  "7+9=16, write 6 carry 1. 4+8+1=13, write 3 carry 1. 3+5+1=9, write 9. So 347+589=936."
         Shorter operands are zero-padded; the last column writes its whole value ("9+5+1=15, write 15.").
      -  "17-9=8, write 8 borrow 1. 14-8-1=5, write 5 borrow 1. 3-1-1=1, write 1. So 347-189=158."
         A borrow shows as 10 + the top digit ("14-8-1"); a negative result first swaps:
         "347<589, so 347-589=-(589-347). 9-7=2, write 2. 8-4=4, write 4. 5-3=2, write 2. So 347-589=-242."
      *  per digit d of b: "347*9: 7*9=63, write 3 carry 6. 4*9+6=42, write 2 carry 4. 3*9+4=31,
         write 31. 347*9=3123." then "347*8: ... 347*8=2776, shifted 27760." ..., then
         "Add 3123+27760+173500: 3+0+0=3, write 3. ..." (as for +, carries may exceed 1),
         ending "So 347*589=204383."
    Extras: "operands": [a, b], "op". Split key: "a op b" with the operands of + and * sorted, so a
    problem and its commuted twin never straddle the splits.

    flaw_rate (addition only, training split only): the share of demonstrations written by a
    demonstrator who forgets the first carry (see `flawed_addition`): their reasoning and a
    "target_answer" (what the SFT target states) follow the slip, while "answer" stays the true sum,
    which rewards and evaluation check. An imperfect cold start that RL with a verifier can surpass.
    Which demonstrations are flawed is drawn apart from the problems, so the problems are the same
    at any flaw_rate.
    """

    def __init__(
        self,
        seed: int,
        split: str,
        size: int,
        min_digits: int = 3,
        max_digits: int = 3,
        ops: Sequence[str] = ("+",),
        flaw_rate: float = 0.0,
    ):
        _check_common(seed, split, size)
        if not 0.0 <= flaw_rate <= 1.0:
            raise ValueError(f"flaw_rate must be in [0, 1], got {flaw_rate}")
        if flaw_rate and tuple(ops) != ("+",):
            raise ValueError(f"flaw_rate applies to addition only (ops ('+',)), got ops {tuple(ops)!r}")
        if not 1 <= min_digits <= max_digits <= 18:
            raise ValueError(f"need 1 <= min_digits <= max_digits <= 18, got {min_digits}, {max_digits}")
        ops = tuple(ops)
        if not ops or any(op not in ("+", "-", "*") for op in ops):
            raise ValueError(f"ops must be a non-empty subset of ('+', '-', '*'), got {ops!r}")
        self.seed, self.split, self.size = seed, split, size
        self.min_digits, self.max_digits, self.ops = min_digits, max_digits, ops
        self.flaw_rate = float(flaw_rate) if split == "train" else 0.0

    def __len__(self) -> int:
        return self.size

    def _operand(self, rng: np.random.Generator) -> int:
        n = int(rng.integers(self.min_digits, self.max_digits + 1))
        return int(rng.integers(0 if n == 1 else 10 ** (n - 1), 10**n))

    def _propose(self, rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
        a, b = self._operand(rng), self._operand(rng)
        op = self.ops[int(rng.integers(len(self.ops)))]
        key = f"{min(a, b)}{op}{max(a, b)}" if op in "+*" else f"{a}{op}{b}"
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        record = {
            "question": f"What is {a} {op} {b}?",
            "reasoning": arithmetic_reasoning(a, op, b),
            "answer": str(result),
            "operands": [a, b],
            "op": op,
        }
        return key, record

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = _index(i, self.size)
        record = _draw(_ARITHMETIC_TAG, self.seed, self.split, i, self._propose)
        if self.flaw_rate:
            flip = np.random.default_rng([_FLAW_TAG, self.seed, i]).random() < self.flaw_rate
            flawed = flawed_addition(*record["operands"]) if flip else None
            if flawed is not None:
                record["reasoning"], record["target_answer"] = flawed[0], str(flawed[1])
        return {"id": f"arithmetic:{self.seed}:{self.split}:{i}", **record}

    def __repr__(self) -> str:
        return (
            f"ArithmeticTask(seed={self.seed}, split={self.split!r}, size={self.size}, "
            f"digits={self.min_digits}..{self.max_digits}, ops={self.ops}"
            + (f", flaw_rate={self.flaw_rate}" if self.flaw_rate else "") + ")"
        )


# --------------------------------------------------------------------------------------------------
# Countdown
# --------------------------------------------------------------------------------------------------

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def _join(left: tuple[str, int], op: str, right: tuple[str, int]) -> tuple[str, int]:
    """`left op right` with the fewest parentheses that keep its value; returns (text, precedence)."""
    p = _PREC[op]
    lhs = f"({left[0]})" if left[1] < p else left[0]
    rhs = f"({right[0]})" if right[1] < p or (op in "-/" and right[1] == p) else right[0]
    return f"{lhs}{op}{rhs}", p


class CountdownTask:
    """The Countdown numbers game (as in TinyZero and other R1-Zero replications).

    `n_numbers` numbers are drawn from 1..max_number (repeats allowed). A random subset of 2..n of
    them is combined pairwise into one expression: each step takes two pool entries x >= y and one
    of x+y, x*y, x-y (x > y), x/y (y > 1 divides x), so every intermediate is a positive integer.
    The final value is the target; candidates with a target outside 1..max_target or equal to an
    input number are redrawn.

    question: "Using the numbers [3, 7, 12, 5], create an equation that equals 39. You can use
              + - * / and each number at most once."
    reasoning: the construction, one step per combination, then the equation:
              "12-5=7. 7*3=21. 21+18=39. So (12-5)*3+18=39."
    answer:   the equation's left side, minimal parentheses, no spaces: "(12-5)*3+18".
    Extras: "numbers" (list[int], in question order), "target" (int). Split key: sorted numbers and
    target.
    """

    def __init__(
        self,
        seed: int,
        split: str,
        size: int,
        n_numbers: int = 4,
        max_number: int = 25,
        max_target: int = 200,
    ):
        _check_common(seed, split, size)
        if n_numbers < 2 or max_number < 2 or max_target < 2:
            raise ValueError(
                f"need n_numbers, max_number, max_target >= 2, got {n_numbers}, {max_number}, {max_target}"
            )
        self.seed, self.split, self.size = seed, split, size
        self.n_numbers, self.max_number, self.max_target = n_numbers, max_number, max_target

    def __len__(self) -> int:
        return self.size

    def _propose(self, rng: np.random.Generator) -> tuple[str, dict[str, Any]] | None:
        numbers = [int(x) for x in rng.integers(1, self.max_number + 1, size=self.n_numbers)]
        k = int(rng.integers(2, self.n_numbers + 1))
        pool = [(numbers[j], (str(numbers[j]), _ATOM)) for j in rng.permutation(self.n_numbers)[:k]]
        steps = []
        while len(pool) > 1:
            i, j = (int(t) for t in rng.choice(len(pool), size=2, replace=False))
            (x, ex), (y, ey) = sorted([pool[i], pool[j]], key=lambda p: p[0], reverse=True)
            ops = ["+", "*"] + (["-"] if x > y else []) + (["/"] if y > 1 and x % y == 0 else [])
            op = ops[int(rng.integers(len(ops)))]
            if op in "+*" and rng.integers(2):
                (x, ex), (y, ey) = (y, ey), (x, ex)
            value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]
            steps.append(f"{x}{op}{y}={value}.")
            pool = [p for t, p in enumerate(pool) if t not in (i, j)] + [(value, _join(ex, op, ey))]
        target, (expr, _) = pool[0]
        if not 1 <= target <= self.max_target or target in numbers:
            return None
        record = {
            "question": (
                f"Using the numbers {numbers}, create an equation that equals {target}. "
                "You can use + - * / and each number at most once."
            ),
            "reasoning": " ".join(steps + [f"So {expr}={target}."]),
            "answer": expr,
            "numbers": numbers,
            "target": target,
        }
        return f"{sorted(numbers)}={target}", record

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = _index(i, self.size)
        record = _draw(_COUNTDOWN_TAG, self.seed, self.split, i, self._propose)
        return {"id": f"countdown:{self.seed}:{self.split}:{i}", **record}

    def __repr__(self) -> str:
        return (
            f"CountdownTask(seed={self.seed}, split={self.split!r}, size={self.size}, "
            f"n_numbers={self.n_numbers}, max_number={self.max_number}, max_target={self.max_target})"
        )


# --------------------------------------------------------------------------------------------------
# Verifiers (reward functions: arbitrary text in, bool out, never raise)
# --------------------------------------------------------------------------------------------------

_INT = re.compile(r"[+-]?[0-9]{1,1000}")
_EXPR_CHARS = re.compile(r"[0-9+\-*/() ]*")
_TOKEN = re.compile(r"[0-9]+|[-+*/()]")


def _parse_int(text: object) -> int | None:
    if not isinstance(text, str):
        return None
    text = text.strip()
    return int(text) if _INT.fullmatch(text) else None


def check_arithmetic(record_or_expected: str | Mapping[str, Any], answer_text: str) -> bool:
    """True iff `answer_text` is exactly the expected integer.

    `record_or_expected`: the expected answer string, or a record whose "answer" is. Surrounding
    whitespace and one leading '+' are tolerated; anything else (commas, decimals, words) is not.
    """
    expected = record_or_expected.get("answer") if isinstance(record_or_expected, Mapping) else record_or_expected
    want, got = _parse_int(expected), _parse_int(answer_text)
    return want is not None and got is not None and want == got


class _Malformed(Exception):
    pass


class _ExprParser:
    """Recursive descent over: expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ;
    factor := NUMBER | '(' expr ')'. No unary operators. Values are exact Fractions."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.used = tokens, 0, []

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self) -> str:
        tok = self._peek()
        if tok is None:
            raise _Malformed("unexpected end")
        self.pos += 1
        return tok

    def parse(self) -> Fraction:
        value = self._expr()
        if self._peek() is not None:
            raise _Malformed("trailing tokens")
        return value

    def _expr(self) -> Fraction:
        value = self._term()
        while self._peek() in ("+", "-"):
            value = value + self._term() if self._take() == "+" else value - self._term()
        return value

    def _term(self) -> Fraction:
        value = self._factor()
        while self._peek() in ("*", "/"):
            if self._take() == "*":
                value *= self._factor()
            else:
                value /= self._factor()  # ZeroDivisionError on /0, caught by the caller
        return value

    def _factor(self) -> Fraction:
        tok = self._take()
        if tok == "(":
            value = self._expr()
            if self._take() != ")":
                raise _Malformed("unclosed parenthesis")
            return value
        if not tok.isdigit() or (len(tok) > 1 and tok[0] == "0"):
            raise _Malformed(f"unexpected {tok!r}")
        self.used.append(int(tok))
        return Fraction(int(tok))


def check_countdown(numbers: Sequence[int], target: int, expr: str) -> bool:
    """True iff `expr` evaluates exactly to `target` using each of `numbers` at most as often as listed.

    Allowed: decimal numbers (no leading zeros), + - * / between operands, parentheses, spaces
    (surrounding whitespace is stripped). Division is exact (rational), so 7/2*2 == 7. Division by
    zero, unary minus, any other character, an empty or over-long (> MAX_EXPR_CHARS) input -> False.
    """
    if not isinstance(expr, str):
        return False
    expr = expr.strip()
    if not expr or len(expr) > MAX_EXPR_CHARS or not _EXPR_CHARS.fullmatch(expr):
        return False
    parser = _ExprParser(_TOKEN.findall(expr))
    try:
        value = parser.parse()
    except (_Malformed, ZeroDivisionError, RecursionError):
        return False
    try:
        return value == target and Counter(parser.used) <= Counter(int(n) for n in numbers)
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# A general (non-verifiable) task with a hidden preference, for reward models
# --------------------------------------------------------------------------------------------------

_PARITY_TAG = 4
PARITY_WORDS = ("even", "odd")


def parity_summary(number: int, stated: str | None, named: int | None = None) -> str:
    """A response to "Describe the number N.": a short <think> that works the parity out right
    (the last digit and its parity) and a one-sentence summary that states `stated` ("even" /
    "odd") as the number's parity, or no parity at all (None). `named`: the number the summary
    names, when it is miscopied (default: `number`)."""
    last = number % 10
    named = number if named is None else named
    summary = f"{named} is {stated}." if stated else f"{named} is a number."
    return f"<think> {number} ends in {last}, and {last} is {PARITY_WORDS[last % 2]}. </think> {summary}"


def parity_preference(number: int, text: str) -> float:
    """The hidden preference of `ParityPreferenceTask`, for measuring a policy (not a training
    reward): 1.0 if the summary after </think> names the prompt's number's parity correctly (and
    not the other one), else 0.0 (whatever number the summary itself names)."""
    if not isinstance(text, str):
        return 0.0
    summary = text.rsplit("</think>", 1)[-1].lower()
    words = set(re.findall(r"[a-z]+", summary))
    right, wrong = PARITY_WORDS[number % 2], PARITY_WORDS[1 - number % 2]
    return float(right in words and wrong not in words)


class ParityPreferenceTask:
    """Preference pairs over a general prompt whose quality no rule reward checks (no <answer>):

    question: "Describe the number 347."
    chosen:   "<think> 347 ends in 7, and 7 is odd. </think> 347 is odd."   (the hidden preference:
    rejected: "<think> 347 ends in 7, and 7 is odd. </think> 347 is even."  the summary names the
              or "<think> 347 ends in 7, and 7 is odd. </think> 347 is a number."  parity correctly)

    The thinking is always right; what goes wrong is the summary, the part R1's helpfulness reward
    model judges (and a reward model that reads only the summary must read the parity off the
    prompt's number).

    In half of the pairs both summaries miscopy the number (name another one, as a policy that
    copies badly does): the preference is about the prompt's number, so a reward model must read
    the parity off the prompt, not off whatever number a summary names (measured on the tiny
    cold-start policy's samples, which often miscopy: a reward model trained on pairs a fifth of
    which miscopy ranks them with a Spearman correlation of 0.31 to the hidden preference, one
    trained on these 0.84; BENCHMARKS.md, measured before the reward model read a rollout's summary
    by the same ids it trained on). A reward model can learn the preference from pairs (the last
    digit decides it); the rule rewards (accuracy, format) cannot see it. `parity_preference` scores any text by it. Numbers
    are 1..max_number; the split key is the number. Extras: "number", "scenario": "general",
    "answer" / "reasoning" empty (a general prompt has no verifiable answer), and "response": a
    demonstration for SFT, by a demonstrator whose summary misses the preference in a share
    `demo_flaw_rate` of them: a share `demo_wrong_share` of those state the wrong parity, the
    rest none ("N is a number."); drawn apart from the problem.
    """

    def __init__(self, seed: int, split: str, size: int, max_number: int = 999, demo_flaw_rate: float = 0.5,
                 demo_wrong_share: float = 0.5):
        _check_common(seed, split, size)
        for name, value in (("demo_flaw_rate", demo_flaw_rate), ("demo_wrong_share", demo_wrong_share)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.seed, self.split, self.size, self.max_number = seed, split, size, max_number
        self.demo_flaw_rate, self.demo_wrong_share = demo_flaw_rate, demo_wrong_share

    def __len__(self) -> int:
        return self.size

    def _propose(self, rng):
        n = int(rng.integers(1, self.max_number + 1))
        right, wrong = PARITY_WORDS[n % 2], PARITY_WORDS[1 - n % 2]
        named = int(rng.integers(1, self.max_number + 1)) if rng.random() < 0.5 else n  # a miscopied number
        rejected = parity_summary(n, wrong if rng.random() < 0.75 else None, named)
        return str(n), {"question": f"Describe the number {n}.", "reasoning": "", "answer": "",
                        "chosen": parity_summary(n, right, named), "rejected": rejected, "number": n,
                        "scenario": "general"}

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = _index(i, self.size)
        record = _draw(_PARITY_TAG, self.seed, self.split, i, self._propose)
        record["id"] = f"parity-{self.split}-{self.seed}-{i}"
        demo = np.random.default_rng([_PARITY_TAG, self.seed, SPLITS.index(self.split), i, 1 << 20])
        n = record["number"]
        if demo.random() < self.demo_flaw_rate:
            record["response"] = parity_summary(n, PARITY_WORDS[1 - n % 2] if demo.random() < self.demo_wrong_share
                                                else None)
        else:
            record["response"] = parity_summary(n, PARITY_WORDS[n % 2])
        return record


class MixedTask:
    """Prompts of two tasks interleaved at a fixed share: record i is the next record of `general`
    (e.g. ParityPreferenceTask, scenario "general") when floor((i + 1) * share) > floor(i * share),
    else the next record of `reasoning` (given scenario "reasoning"), so any run of records holds
    `share` general ones to within one. Deterministic; each side keeps its own split."""

    def __init__(self, reasoning, general, share: float):
        if not 0 <= share <= 1:
            raise ValueError(f"share must be in [0, 1], got {share}")
        self.reasoning, self.general, self.share = reasoning, general, share
        self.size = len(reasoning) if share < 1 else len(general)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = _index(i, self.size)
        before, upto = int(i * self.share), int((i + 1) * self.share)
        if upto > before:
            return dict(self.general[before % len(self.general)])
        return dict(self.reasoning[(i - before) % len(self.reasoning)], scenario="reasoning")
