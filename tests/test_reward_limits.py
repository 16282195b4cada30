"""Rewards bounded in time and memory (issue 11, item 2): extraction linear in the text, the explosion
pre-check before the verifier, reward workers under an address-space cap, and a seeded fuzz run of
hostile completions through the GRPO reward function and the evaluation scorer."""

import random
import re
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1jax.data import aime2024, gsm8k, math500
from r1jax.evaluate import eval_scorer
from r1jax.rewards import (
    RewardFn,
    answer_tag,
    answers_equivalent,
    explodes,
    extract_answer,
    extract_boxed,
    format_reward,
    language_consistency,
)
from r1jax.rewards.accuracy import refusals
from r1jax.rewards.code import extract_program
from r1jax.rewards.combine import (
    MAX_COMPLETION_CHARS,
    MEMORY_MB,
    peak_rss_mb,
    score_components,
)

MB = 1 << 20

# --------------------------------------------------------------------------------------------------
# Extraction: linear, and the same answers as the plain scan
# --------------------------------------------------------------------------------------------------


def boxed_by_plain_scan(text):
    """extract_boxed as first written (quadratic): from the last \\boxed/\\fbox back, the first whose
    argument is complete; braces counted char by char from the argument's "{", a backslash escaping
    the next character; a bare argument runs to the next whitespace or "$"."""
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text))):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j, inner = 0, i, None
            while j < len(text):
                if text[j] == "\\":
                    j += 2
                    continue
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    inner = text[i + 1:j]
                    break
                j += 1
        else:
            inner = re.match(r"[^\s$]*", text[i:]).group(0) or None
        if inner is not None:
            return inner.strip()
    return None


BOX_PARTS = ["\\boxed", "\\fbox", "\\boxedx", "{", "}", "\\{", "\\}", "\\\\", "\\", " ", "$", "x", "1", "\n",
             "\\frac{1}{2}", "<answer>", "</answer>"]


@given(st.lists(st.sampled_from(BOX_PARTS), max_size=40))
@settings(max_examples=600, deadline=None)
def test_extract_boxed_returns_what_the_plain_scan_returns(parts):
    text = "".join(parts)
    assert extract_boxed(text) == boxed_by_plain_scan(text)


FLOODS = {
    "boxed": "\\boxed{" * (MB // 7),  # 1 MB of unclosed boxes (8000 of them took 13.5 s before)
    "boxed closed": "\\boxed{" * (MB // 14) + "}" * (MB // 14),
    "fbox escapes": "\\fbox{\\" * (MB // 7),
    "answer": "<answer>" * (MB // 8),
    "answer in boxes": "<answer>\\boxed{" * (MB // 15) + "</answer>",
    "braces": "{" * MB,
    "think": "<think>" * (MB // 7),
    "bare boxes": "\\boxed " * (MB // 7),
    "fence and spaces": "```" + " " * MB,  # 64k of these took 4.4 s in extract_program
    "fences": "```python\n" * (MB // 10),
}


@pytest.mark.parametrize("name", list(FLOODS))
def test_extraction_and_format_and_language_on_a_1mb_flood_take_under_a_second(name):
    text = FLOODS[name]
    for fn in (extract_answer, extract_boxed, answer_tag, format_reward, language_consistency, extract_program):
        start = time.perf_counter()
        fn(text)
        assert time.perf_counter() - start < 1.0, fn.__name__


def test_flood_answers_are_the_plain_ones():
    for name, text in FLOODS.items():  # the same floods, 2 KB long, against the plain scan
        small = text[:2048] + text[-64:]
        assert extract_boxed(small) == boxed_by_plain_scan(small), name
    assert extract_answer(FLOODS["boxed"]) is None
    assert extract_boxed(FLOODS["boxed closed"]) == ""  # the last \\boxed, the innermost, holds nothing
    assert extract_boxed("\\boxed{" * 50_000 + "7" + "}") == "7"
    assert extract_boxed("\\boxed{" * 50_000 + "\\boxed 3") == "3"
    assert extract_boxed("\\fbox{" + "{" * 50_000 + "}" * 50_000 + "}") == "{" * 50_000 + "}" * 50_000
    tagged = FLOODS["answer in boxes"]  # one tag, whose boxes never close: its whole content
    assert extract_answer(tagged) == tagged[len("<answer>"):-len("</answer>")]
    assert extract_answer(FLOODS["answer in boxes"][:-len("</answer>")] + "9}</answer>") == "9"


# --------------------------------------------------------------------------------------------------
# The explosion pre-check
# --------------------------------------------------------------------------------------------------

EXPLODING = ["10^{10^{10^{10}}}", "9^{99999999}", "100000!", "(10^{10})!", "10**10**10", "9^{9^{9}}", "2^{10^{10}}",
             "10^{10}^{10}", "10^10^10^10", "\\left(10^{10}\\right)^{10^{10}}", "1.0000001^{10^{9}}",
             "99999999999999999999^{9999999999}", "1e999999", "10**10**1e10", "10^{-10^{10}}",
             "x^{10^{10}}", "(x+1)^{100000}", "x^{10^{9} n}", "e^{10^{9}}", "\\exp(10^{9})", "99^{10^{e^{9}}}",
             "\\binom{10^{7}}{5}", "\\Gamma(1000000)", "\\prod_{k=1}^{10^{9}} k", "\\sum_{k=1}^{10^{10}} k^{2}",
             "\\begin{pmatrix}1&1\\\\1&0\\end{pmatrix}^{10^{9}}", "{" * 60 + "1" + "}" * 60]
ORDINARY = ["2^{10}", "\\frac{1}{2}", "x^{2}+1", "10!", "2^{2005}", "2^{n}", "n^{n}", "6.02\\times10^{23}",
            "30^\\circ", "\\sqrt[3]{2}", "2^{2^{2^{2^{2}}}}", "\\binom{10}{3}", "e^{-x^{2}/2}", "x^{2005}", "1e10",
            "\\left( 3, \\frac{\\pi}{2} \\right)", "3^{100}-1", "\\dfrac{33}{100}", "20000!"]


@pytest.mark.parametrize("text", EXPLODING)
def test_precheck_refuses_towers_powers_factorials(text):
    assert explodes(text)


@pytest.mark.parametrize("text", ORDINARY)
def test_precheck_passes_ordinary_answers(text):
    assert not explodes(text)


def test_precheck_passes_every_shipped_reference_answer():
    for load in (gsm8k, math500, aime2024):
        src = load()
        refused = [src[i]["answer"] for i in range(len(src)) if explodes(src[i]["answer"])]
        assert refused == [], (load.__name__, refused)


@pytest.mark.parametrize("expected, got", [("1024", "2^{10}"), ("3628800", "10!"), ("1+x^{2}", "x^{2}+1"),
                                           ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "2^{-1}"),
                                           ("2^{2005}", "2\\cdot 2^{2004}"), ("120", "\\binom{10}{3}")])
def test_ordinary_answers_are_still_judged_by_the_verifier(expected, got):
    before = refusals()
    assert answers_equivalent(expected, got)
    assert not answers_equivalent(expected, got + "+1")
    assert refusals() == before


@pytest.mark.parametrize("gold", ["2^{n}", "n^{n}", "x^{2}+1"])
def test_exploding_answers_score_zero_fast_and_are_counted(gold):
    record = {"id": "math500:1", "question": "q", "answer": gold}
    towers = [f"\\boxed{{{t}}}" for t in ("10^{10^{10^{10}}}", "9^{99999999}", "100000!", "9^{9^{9}}")]
    fn = RewardFn({"accuracy": 1.0}, inline=True)
    start = time.perf_counter()
    out = fn(towers, [record] * len(towers))
    assert time.perf_counter() - start < 5.0  # 7-22 s each (and 8.5 GB) without the pre-check
    assert out["accuracy"].tolist() == [0.0] * len(towers)
    assert fn.stats()["refusals"] == len(towers)


# --------------------------------------------------------------------------------------------------
# Worker limits: address space, over-long completions
# --------------------------------------------------------------------------------------------------

GOOD = " <think> add </think> <answer> 7 </answer>"
SEVEN = {"id": "gsm8k:1", "question": "q", "answer": "7"}


def _address_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        return next(line for line in f if line.startswith("Max address space")).split()[3]


def test_workers_set_their_address_space_cap():
    with RewardFn({"accuracy": 1.0}, workers=2, timeout=30.0) as fn:
        assert fn([GOOD], [SEVEN])["accuracy"].tolist() == [1.0]
        assert [_address_limit(w.proc.pid) for w in fn._workers] == [str(MEMORY_MB * MB)] * 2
    with RewardFn({"accuracy": 1.0}, workers=1, timeout=30.0, memory_mb=700) as fn:
        fn([GOOD], [SEVEN])
        assert _address_limit(fn._workers[0].proc.pid) == str(700 * MB)


def test_an_exploding_answer_stays_under_the_cap_without_the_precheck():
    """With the pre-check off, 10^{10^{10^{10}}} against a MATH-style answer makes sympy allocate
    4.3 GB (measured, under a 5 GB ulimit); under a 400 MB cap the allocation fails in the worker, the
    answer scores 0 in the verifier's time and the worker's own peak RSS stays under the cap."""
    records = [{"id": "math500:1", "question": "q", "answer": g} for g in ("x^{2}+1", "2^{n}")]
    with RewardFn({"accuracy": 1.0}, workers=1, timeout=30.0, memory_mb=400, precheck=False) as fn:
        fn([GOOD], [SEVEN])
        assert _address_limit(fn._workers[0].proc.pid) == str(400 * MB)  # else stop before allocating
        out = fn(["\\boxed{10^{10^{10^{10}}}}"] * 2, records)
        stats = fn.stats()
        assert out["accuracy"].tolist() == [0.0, 0.0]
        assert stats["refusals"] == 0 and stats["timeouts"] == 0  # the verifier saw it and gave up
        assert 0 < stats["worker_peak_rss_mb"] < 400
        assert fn([GOOD], [SEVEN])["accuracy"].tolist() == [1.0]


def test_a_worker_that_dies_at_its_cap_is_replaced_and_counted():
    """A 64 MB completion (max_chars off) does not fit a 256 MB worker: it dies reading it, the item
    scores 0, the death is counted and the next completions are scored by its replacement."""
    with RewardFn({"accuracy": 1.0, "format": 1.0}, workers=1, timeout=30.0, memory_mb=256, max_chars=0) as fn:
        assert fn([GOOD], [SEVEN])["total"].tolist() == [2.0]
        first = fn._workers[0].proc.pid
        out = fn([GOOD + " " * (64 * MB), GOOD], [SEVEN, SEVEN])  # trailing spaces: well-formed and right
        stats = fn.stats()
        assert out["total"].tolist() == [0.0, 2.0]
        assert stats["crashes"] == 1 and stats["restarts"] >= 1 and stats["timeouts"] == 0
        assert fn._workers[0].proc.pid != first
        assert fn([GOOD], [SEVEN])["total"].tolist() == [2.0]


def test_completions_over_max_chars_score_zero_everywhere():
    long = GOOD + " " * 1000  # well formed, right, English: 1.0 on every component when scored
    weights = {"accuracy": 1.0, "format": 1.0, "language": 1.0}
    assert score_components(long, SEVEN, tuple(weights))["format"] == 1.0
    assert score_components(long, SEVEN, tuple(weights), max_chars=1000) == dict.fromkeys(weights, 0.0)
    for inline in (True, False):
        with RewardFn(weights, inline=inline, workers=1, max_chars=1000) as fn:
            out = fn([long, GOOD], [SEVEN, SEVEN])
            assert out["total"].tolist() == [0.0, 3.0]
            assert fn.stats()["oversized"] == 1


def test_reward_fn_rejects_negative_limits():
    with pytest.raises(ValueError, match="memory_mb"):
        RewardFn({"accuracy": 1.0}, memory_mb=-1)
    with pytest.raises(ValueError, match="max_chars"):
        RewardFn({"accuracy": 1.0}, max_chars=-5)


# --------------------------------------------------------------------------------------------------
# Fuzz: 2,000 hostile completions through RewardFn (GRPO) and the evaluation scorer
# --------------------------------------------------------------------------------------------------

MATH_STYLE = ["2^{n}", "n^{n}", "x^{2}+1", "\\frac{1}{2}", "72", "\\sqrt{2}", "(1, 2)", "10!"]
BASES = ["10", "9", "2", "99", "x", "e", "n", "(10)", "1.0000001", "\\pi"]


def _tower(rng):
    s = rng.choice(["10", "9", "7"])
    for _ in range(rng.randint(2, 5)):
        s = f"{rng.choice(BASES)}^{{{s}}}" if rng.random() < 0.8 else f"{rng.choice(BASES)}**{s}"
    return s


EXPLOSIVE = [
    _tower,
    lambda r: f"{r.randint(2, 99)}^{{{r.randint(10**7, 10**9)}}}",
    lambda r: f"{r.randint(10**5, 10**7)}!",
    lambda r: f"({r.randint(10, 99)}^{{{r.randint(6, 12)}}})!",
    lambda r: f"x^{{10^{{{r.randint(5, 12)}}}}}",
    lambda r: f"e^{{10^{{{r.randint(6, 12)}}}}}",
    lambda r: f"\\binom{{10^{{{r.randint(6, 9)}}}}}{{{r.randint(2, 9)}}}",
    lambda r: f"\\prod_{{k=1}}^{{10^{{{r.randint(5, 9)}}}}} k",
    lambda r: f"1e{r.randint(10**5, 10**9)}",
    lambda r: "9" * r.randint(50, 300) + "^{" + "9" * r.randint(6, 40) + "}",
]


def _explosive(rng):
    return rng.choice(EXPLOSIVE)(rng)


def _stated(rng, answer):
    """`answer` as a completion states it: in <answer>, in \\boxed, in both, or after ####."""
    return rng.choice([f" <think> {rng.choice(['so', 'compute', '我们'])} </think> <answer> {answer} </answer>",
                       f"the answer is \\boxed{{{answer}}}.", f"<think>x</think> <answer> \\boxed{{{answer}}} </answer>",
                       f"#### {answer}"])


def _unicode(rng, n):
    out = []
    for _ in range(n):
        cp = rng.randint(*rng.choice([(0x20, 0x7e), (0xa0, 0x2fff), (0x3040, 0x9fff), (0x1f300, 0x1faff),
                                      (0x0, 0x10ffff)]))
        out.append(chr(0x41 if 0xD800 <= cp <= 0xDFFF else cp))
    return "".join(out)


def nested_boxes(rng):
    n = rng.choice([rng.randint(1, 50), rng.randint(1000, 30000)])
    inner = rng.choice(["5", _explosive(rng), "x^{2}+1", ""])
    return "\\boxed{" * n + inner + "}" * rng.choice([0, n, rng.randint(0, n)])


def tag_flood(rng):
    tag = rng.choice(["<answer>", "</answer>", "<think>", "</think>", "<answer></answer>", "\\boxed", "\\fbox{",
                      "####", "```python\n", "{", "\\{", "\\\\", "$"])
    text = tag * rng.randint(1000, 100_000)
    if rng.random() < 0.5:
        text = _stated(rng, _explosive(rng)) + text
    return text + rng.choice(["", "7</answer>", "}", "\\boxed{3}"])


def tower(rng):
    return _stated(rng, _explosive(rng))


def long_line(rng):
    size = rng.choice([MB, MB + 100_000, rng.randint(100_000, MAX_COMPLETION_CHARS)])
    unit = rng.choice(["9", "x", " ", "{", "a b ", "\\boxed{1}", "<answer>", "^{", "我", "\\frac{1}{2}+"])
    body = (unit * (size // len(unit) + 1))[:size]
    return rng.choice(["", "<think>", "<answer>", "\\boxed{"]) + body + rng.choice(["", "</answer>", "}"])


def random_unicode(rng):
    text = _unicode(rng, rng.randint(0, 400))
    return _stated(rng, text) if rng.random() < 0.5 else text


KINDS = {"nested_boxes": (nested_boxes, 3), "tag_flood": (tag_flood, 2), "tower": (tower, 4),
         "long_line": (long_line, 1), "random_unicode": (random_unicode, 4)}


def hostile_batches(seed: int, n: int, batch: int):
    """n hostile (kind, completion, MATH-style record) in batches, made as they are scored (1 MB lines)."""
    rng = random.Random(seed)
    names = list(KINDS)
    for start in range(0, n, batch):
        kinds = rng.choices(names, weights=[KINDS[k][1] for k in names], k=min(batch, n - start))
        yield [(k, KINDS[k][0](rng), {"id": f"math500:{start + j}", "question": "q",
                                       "answer": rng.choice(MATH_STYLE)}) for j, k in enumerate(kinds)]


N_FUZZ, FUZZ_BATCH, FUZZ_TIMEOUT = 2000, 100, 10.0


def _fuzz(fn, names):
    """Score N_FUZZ hostile completions with fn in batches; returns (towers, oversized) seen, after
    checking every batch's scores and time."""
    towers = over = 0
    for batch in hostile_batches(0, N_FUZZ, FUZZ_BATCH):
        texts, records = [c for _, c, _ in batch], [r for _, _, r in batch]
        start = time.monotonic()
        out = fn(texts, records)
        # each completion costs at most its timeout, on one of 2 workers
        assert time.monotonic() - start < FUZZ_TIMEOUT * len(batch) / 2 + 30
        for name in names:
            assert out[name].dtype == np.float32 and out[name].shape == (len(batch),)
            assert np.all((out[name] >= 0) & (out[name] <= 1)), name
        long = np.array([len(c) > MAX_COMPLETION_CHARS for c in texts])
        for name in names:
            assert not out[name][long].any(), name  # over max_chars: 0 on every component, unread
        towers += sum(k == "tower" for k, _, _ in batch)
        over += int(long.sum())
    return towers, over


def _check_stats(fn, towers, over):
    stats = fn.stats()
    assert stats["completions"] == N_FUZZ and stats["oversized"] == over > 0
    assert stats["refusals"] >= towers > 300  # every stated tower, power, factorial was refused by the pre-check
    assert stats["timeouts"] == 0 and stats["crashes"] == 0  # nothing needed killing ...
    assert stats["slowest_seconds"] < FUZZ_TIMEOUT  # ... every completion answered within its timeout
    assert 0 < stats["worker_peak_rss_mb"] < MEMORY_MB  # as each worker measured itself (VmHWM)
    for w in fn._workers:  # and as /proc says of the live ones now
        assert 0 < peak_rss_mb(w.proc.pid) < MEMORY_MB
    print(f"fuzz: {stats}")


def test_fuzz_hostile_completions_through_the_grpo_reward_function():
    weights = {"accuracy": 1.0, "format": 0.5, "language": 0.25}
    with RewardFn(weights, workers=2, timeout=FUZZ_TIMEOUT) as fn:
        towers, over = _fuzz(fn, list(weights))
        _check_stats(fn, towers, over)


def test_fuzz_hostile_completions_through_the_eval_scorer():
    with eval_scorer("r1_zero", workers=2, timeout=FUZZ_TIMEOUT) as scorer:
        towers, over = _fuzz(scorer, ["accuracy"])
        _check_stats(scorer, towers, over)


# --------------------------------------------------------------------------------------------------
# The GRPO stage reports the counts
# --------------------------------------------------------------------------------------------------


def test_grpo_score_part_reports_the_reward_functions_counts():
    """GRPOIteration.score (part 2) and metrics (part 6) with a RewardFn: the iteration's refusals and
    over-long completions, not the totals so far; a plain reward function reports none."""
    from types import SimpleNamespace

    from r1jax.config import GRPOConfig
    from r1jax.stages.grpo import GRPOIteration, Updates

    it = object.__new__(GRPOIteration)  # parts 2 and 6 need only these
    it.g, it.tok = GRPOConfig(group_size=2, overlong_max_len=0), SimpleNamespace(eos_id=1)
    it.reward_fn = RewardFn({"accuracy": 1.0, "format": 1.0}, inline=True, max_chars=500)
    record = {"id": "math500:1", "question": "q", "answer": "x^{2}+1"}
    texts = [GOOD.replace("7", "1+x^2"), "\\boxed{10^{10^{10^{10}}}}", "x" * 600, GOOD]
    rollout = SimpleNamespace(texts=texts, records=[record] * 4, num_new=np.array([3, 3, 3, 3]),
                              tokens=np.ones((4, 8), np.int32), lengths=np.array([8, 8, 8, 8]), seconds=1.0,
                              own=None, general=None)
    updates = Updates(state=None, step_metrics=[], skipped=1, seconds=1.0)
    for expected_refusals in (1, 1):  # per iteration: the second call reports its own counts again
        scores = it.score(rollout)
        assert scores.components["accuracy"].tolist() == [1.0, 0.0, 0.0, 0.0]
        m = it.metrics(rollout, scores, {"keep": np.ones(2)}, updates, 0.0)
        assert (m["reward_refusals"], m["reward_oversized"], m["reward_timeouts"]) == (expected_refusals, 1.0, 0.0)
        assert m["reward_restarts"] == m["reward_crashes"] == 0.0
    assert it.reward_fn.stats()["refusals"] == 2
    it.reward_fn = lambda completions, records: {"total": np.zeros(len(completions), np.float32)}
    m = it.metrics(rollout, it.score(rollout), {"keep": np.ones(2)}, updates, 0.0)
    assert not any(k in m for k in ("reward_refusals", "reward_timeouts", "reward_restarts"))
