"""Evaluation metrics as the DeepSeek-R1 paper reports them (arXiv 2501.12948, section 3.1), pure:
no JAX, no stage, no file.

- pass@1: the fraction of a problem's k samples that are correct, averaged over problems;
- pass@j: the unbiased estimate of Chen et al. 2021 (`pass_at_k`);
- cons@k: the majority vote over the k sampled answers (`majority_answer`, `cons_at_k`), answers
  grouped by `answer_equivalence(record)`;
- `summarize`: all of them over samples[problem][j] = (answer or None, correct).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import numpy as np

from r1jax.data.procedural import check_arithmetic
from r1jax.rewards import accuracy

Equivalence = Callable[[str, str], bool]
Sample = tuple[str | None, bool]  # (the sample's extracted answer or None, is the sample correct)


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"pass@k: {name} must be an integer, got {value!r}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1): the chance that
    k of the n samples drawn without replacement hold at least one correct one,
    1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1..n} (1 - k/i)  (the product needs no huge binomials).

    ValueError unless n >= 1, 0 <= c <= n and 1 <= k <= n; TypeError for non-integers.
    """
    n, c, k = _count("n", n), _count("c", c), _count("k", k)
    if n < 1:
        raise ValueError(f"pass@k: n={n} samples; need at least one")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: c={c} correct samples out of n={n}; need 0 <= c <= n")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: k={k} with n={n} samples; need 1 <= k <= n (sample at least k per problem)")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _groups(answers: Sequence[str | None], equivalent: Equivalence | None) -> list[list[int]]:
    """Indices of the answers that are not None, grouped in order of first occurrence. An answer joins
    the first group whose first member `rep` has equivalent(rep, answer) (the earliest answer acts as
    the reference: `answers_equivalent` is not symmetric); identical strings always share a group,
    and with equivalent=None only identical strings do."""
    groups: list[list[int]] = []
    group_of: dict[str, int] = {}  # answer text -> its group: each distinct text is compared once
    for i, ans in enumerate(answers):
        if ans is None:
            continue
        g = group_of.get(ans)
        if g is None:
            g = next((j for j, grp in enumerate(groups)
                      if equivalent is not None and equivalent(answers[grp[0]], ans)), len(groups))
            if g == len(groups):
                groups.append([])
            group_of[ans] = g
        groups[g].append(i)
    return groups


def _majority(answers: Sequence[str | None], equivalent: Equivalence | None) -> tuple[int | None, int]:
    """(index of the first member of the largest group, its size); a tie goes to the group that occurs
    first; (None, 0) when every answer is None."""
    best, votes = None, 0
    for grp in _groups(answers, equivalent):
        if len(grp) > votes:
            best, votes = grp[0], len(grp)
    return best, votes


def majority_answer(answers: Sequence[str | None], equivalent: Equivalence | None = None) -> str | None:
    """The majority vote of one problem's sampled answers: the first occurrence of the largest group
    of equivalent answers (`equivalent(a, b)`; None: identical strings only). None (no answer) never
    votes; ties go to the group whose first answer comes first. None when no sample answered."""
    i, _ = _majority(answers, equivalent)
    return None if i is None else answers[i]


def cons_at_k(samples: Sequence[Sample], equivalent: Equivalence | None = None) -> bool:
    """Is one problem's majority answer right (R1's cons@k, for one problem)? `samples` are its k
    (answer, correct) pairs; the winning group's verdict is that of its first sample (equivalent
    answers share a verdict when the checker and the equivalence agree). False when nothing answered."""
    i, _ = _majority([a for a, _ in samples], equivalent)
    return i is not None and bool(samples[i][1])


def summarize(samples: Sequence[Sequence[Sample]], ks: Sequence[int] = (),
              equivalent: Equivalence | Sequence[Equivalence | None] | None = None) -> dict:
    """Aggregate metrics of samples[problem][j] = (answer or None, correct), the same number k of
    samples for every problem.

    `ks`: the j of each pass@j to report besides pass@1 (each 1 <= j <= k). `equivalent`: the answer
    equivalence of the majority vote, one for all problems or one per problem (see `majority_answer`).

    Returns {"pass@1": mean over problems of the fraction of correct samples, "pass@<j>": mean of
    `pass_at_k(k, c, j)`, "cons@<k>": fraction of problems whose majority answer is right, "answered":
    fraction of samples with an answer, "n": problems, "k": samples per problem, "problems": per problem
    {"n_correct", "k", "majority", "majority_votes", "majority_correct"}}.
    """
    if not samples:
        raise ValueError("summarize: no problems")
    k = len(samples[0])
    if k < 1 or any(len(s) != k for s in samples):
        raise ValueError(f"summarize: every problem needs the same number (>= 1) of samples; "
                         f"got {sorted({len(s) for s in samples})}")
    if equivalent is None or callable(equivalent):
        equivalent = [equivalent] * len(samples)
    elif len(equivalent) != len(samples):
        raise ValueError(f"summarize: {len(equivalent)} equivalences for {len(samples)} problems")
    ks = sorted({1, *(_count("k", j) for j in ks)})
    for j in ks:
        if not 1 <= j <= k:
            raise ValueError(f"summarize: pass@{j} needs at least {j} samples per problem; there are {k}")
    rows = []
    for problem, eq in zip(samples, equivalent):
        best, votes = _majority([a for a, _ in problem], eq)
        rows.append({"n_correct": sum(bool(ok) for _, ok in problem), "k": k,
                     "majority": None if best is None else problem[best][0], "majority_votes": votes,
                     "majority_correct": best is not None and bool(problem[best][1])})
    out = {f"pass@{j}": float(np.mean([pass_at_k(k, r["n_correct"], j) for r in rows])) for j in ks}
    out[f"cons@{k}"] = float(np.mean([r["majority_correct"] for r in rows]))
    out["answered"] = float(np.mean([a is not None for problem in samples for a, _ in problem]))
    return {**out, "n": len(rows), "k": k, "problems": rows}


def _same_expression(a: str, b: str) -> bool:
    return "".join(a.split()) == "".join(b.split())


def _same_integer(a: str, b: str) -> bool:
    return a.strip() == b.strip() or check_arithmetic(a, b)


def answer_equivalence(record: dict) -> Equivalence:
    """How the majority vote groups the answers to `record`, in step with `accuracy_reward`:

    - "arithmetic:..." records: the same integer (`check_arithmetic`: "+7" == " 7"), or the same text;
    - "countdown:..." records: the same expression up to whitespace. Not the same value: "7" and
      "3+4" both equal 7, but only an expression that uses the given numbers is right;
    - code records ("tests"): the same program text;
    - any other (math) record: `answers_equivalent` ("1/2" == "0.5" == "\\frac{1}{2}").
    """
    rid = str(record.get("id", ""))
    if rid.startswith("arithmetic:"):
        return _same_integer
    if rid.startswith("countdown:"):
        return _same_expression
    if accuracy.is_code_record(record):
        return operator.eq
    return accuracy.answers_equivalent
