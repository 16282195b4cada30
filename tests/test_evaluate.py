"""Evaluation metrics against plain re-derivations written here: pass@k by enumerating every k-subset
of the samples, cons@k by a Counter over canonical answers; and `sample_eval` on a tiny random model
with a stub checker whose verdicts the test decides (bookkeeping, keys, row -> prompt, results files)."""

import itertools
import json
import math
import random
from collections import Counter
from fractions import Fraction

import jax
import numpy as np
import pytest

from conftest import CONFIGS
from r1jax.config import load_config
from r1jax.evaluate import sample_eval, summary_path, write_results
from r1jax.metrics import answer_equivalence, cons_at_k, majority_answer, pass_at_k, summarize
from r1jax.models import init_model
from r1jax.rewards.accuracy import accuracy_reward, extract_answer
from r1jax.sampling import generate, pad_prompts
from r1jax.tokenizer import Tokenizer, encode_prompt

# --------------------------------------------------------------------------------------------------
# Plain references
# --------------------------------------------------------------------------------------------------


def pass_by_enumeration(n, c, k):
    """Share of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


# Surface forms and what they mean: the vote must count "1/2", "0.5" and "\frac{1}{2}" as one answer.
CANON = {"1/2": "half", "0.5": "half", "\\frac{1}{2}": "half", "2": "two", "2.0": "two", "3": "three",
         "x+1": "x+1", "1+x": "x+1", None: None}


def canon_equal(a, b):
    return CANON[a] == CANON[b]


def reference_majority(answers):
    """(canonical winner, votes) by a Counter; a tie goes to the canonical answer seen first."""
    counts = Counter(CANON[a] for a in answers if a is not None)
    if not counts:
        return None, 0
    top = max(counts.values())
    first_seen = [CANON[a] for a in answers if a is not None and counts[CANON[a]] == top]
    return first_seen[0], top


def random_problem(rng, k):
    """k (answer, correct) samples; a sample is right iff its canonical answer is this problem's truth."""
    forms = list(CANON)
    truth = rng.choice(["half", "two", "three", "x+1"])
    answers = [rng.choice(forms[:rng.randint(2, len(forms))]) for _ in range(k)]
    return [(a, a is not None and CANON[a] == truth) for a in answers]


# --------------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------------


def test_pass_at_k_equals_enumeration_exhaustively_and_at_random():
    cases = [(n, c, k) for n in range(1, 9) for c in range(n + 1) for k in range(1, n + 1)]
    rng = random.Random(0)
    for _ in range(150):
        n = rng.randint(9, 16)
        cases.append((n, rng.randint(0, n), rng.randint(1, n)))
    for n, c, k in cases:
        assert pass_at_k(n, c, k) == pytest.approx(pass_by_enumeration(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(100, 2000)
        c, k = rng.randint(0, n), rng.randint(1, n)
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        got = pass_at_k(n, c, k)
        assert 0.0 <= got <= 1.0
        assert got == pytest.approx(float(exact), abs=1e-9), (n, c, k)


def test_pass_at_k_edges():
    for n in (1, 2, 7, 64):
        assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, 0, n) == 0.0
        assert pass_at_k(n, n, 1) == 1.0 and pass_at_k(n, n, n) == 1.0
        for c in range(1, n + 1):
            assert pass_at_k(n, c, n) == 1.0  # all samples drawn: right iff any is
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)
    assert pass_at_k(np.int64(5), np.int64(2), np.int64(2)) == pytest.approx(pass_by_enumeration(5, 2, 2))


@pytest.mark.parametrize("n, c, k, err, words", [
    (4, 1, 5, ValueError, "k=5"), (4, 1, 0, ValueError, "k=0"), (4, 5, 1, ValueError, "c=5"),
    (4, -1, 1, ValueError, "c=-1"), (0, 0, 1, ValueError, "n=0"), (4, 1, 1.0, TypeError, "k"),
    (4, True, 1, TypeError, "c"),
])
def test_pass_at_k_rejects_bad_counts(n, c, k, err, words):
    with pytest.raises(err, match=words):
        pass_at_k(n, c, k)


# --------------------------------------------------------------------------------------------------
# Majority vote, cons@k
# --------------------------------------------------------------------------------------------------


def test_majority_and_cons_equal_a_counter_over_canonical_answers():
    rng = random.Random(2)
    for _ in range(400):
        k = rng.randint(1, 12)
        problem = random_problem(rng, k)
        answers = [a for a, _ in problem]
        want, votes = reference_majority(answers)
        got = majority_answer(answers, canon_equal)
        if want is None:
            assert got is None and not cons_at_k(problem, canon_equal)
            continue
        assert CANON[got] == want
        assert got == next(a for a in answers if a is not None and CANON[a] == want)  # its first form
        assert cons_at_k(problem, canon_equal) == next(ok for a, ok in problem if a is not None and CANON[a] == want)
        # without an equivalence only identical strings vote together
        plain = Counter(a for a in answers if a is not None)
        top = max(plain.values())
        assert majority_answer(answers) == next(a for a in answers if a is not None and plain[a] == top)


def test_majority_edge_cases():
    assert majority_answer([]) is None and majority_answer([None, None]) is None
    assert not cons_at_k([(None, False)] * 3) and not cons_at_k([])
    assert majority_answer([None, None, None, "7"]) == "7"  # no answer never wins
    assert majority_answer(["a", "b", "b", "a"]) == "a"  # tie: first occurrence
    assert majority_answer(["b", None, "a", "a", "b"]) == "b"
    assert majority_answer(["c", "a", "b", "a", "b"]) == "a"
    # "1/2", "0.5", "\frac{1}{2}" are one answer (3 votes) and beat "3" (2 votes) under the math equivalence
    answers = ["3", "0.5", "1/2", "3", "\\frac{1}{2}"]
    math_eq = answer_equivalence({"id": "math500:1", "question": "q", "answer": "1/2"})
    assert majority_answer(answers) == "3"
    assert majority_answer(answers, math_eq) == "0.5"
    assert cons_at_k([(a, a != "3") for a in answers], math_eq)
    assert not cons_at_k([(a, a != "3") for a in answers])


def test_answer_equivalence_per_source():
    arith = answer_equivalence({"id": "arithmetic:0:test:1", "question": "q", "answer": "7"})
    assert arith("7", "+7") and arith("7", " 7 ") and not arith("7", "7.0") and arith("seven", "seven")
    assert majority_answer(["8", "7", "+7", "8", " 7"], arith) == "7"
    count = answer_equivalence({"id": "countdown:0:test:1", "question": "q", "answer": "3+4",
                                "numbers": [3, 4], "target": 7})
    assert count("3+4", "3 + 4") and not count("3+4", "7") and not count("3+4", "4+3")
    code = answer_equivalence({"id": "x", "question": "q", "answer": "", "tests": ["assert True"]})
    assert code("print(1)", "print(1)") and not code("print(1)", "print( 1)")
    maths = answer_equivalence({"id": "gsm8k:3", "question": "q", "answer": "72"})
    assert maths("72", "72.0") and maths("\\frac{1}{2}", "0.5") and not maths("72", "73")


# --------------------------------------------------------------------------------------------------
# summarize
# --------------------------------------------------------------------------------------------------


def test_summarize_equals_the_references():
    rng = random.Random(3)
    for _ in range(40):
        k, n_problems = rng.randint(1, 8), rng.randint(1, 6)
        problems = [random_problem(rng, k) for _ in range(n_problems)]
        ks = sorted(rng.sample(range(1, k + 1), min(k, 2)))
        out = summarize(problems, ks=ks, equivalent=canon_equal)
        counts = [sum(ok for _, ok in p) for p in problems]
        assert out["n"] == n_problems and out["k"] == k
        assert out["pass@1"] == pytest.approx(np.mean([c / k for c in counts]))
        for j in ks:
            assert out[f"pass@{j}"] == pytest.approx(np.mean([pass_by_enumeration(k, c, j) for c in counts]))
        cons = []
        for p, row, c in zip(problems, out["problems"], counts):
            want, votes = reference_majority([a for a, _ in p])
            right = want is not None and next(ok for a, ok in p if a is not None and CANON[a] == want)
            cons.append(right)
            assert row["n_correct"] == c and row["k"] == k and row["majority_votes"] == votes
            assert row["majority_correct"] == right
            assert (row["majority"] is None) if want is None else CANON[row["majority"]] == want
        assert out[f"cons@{k}"] == pytest.approx(np.mean(cons))
        assert out["answered"] == pytest.approx(np.mean([a is not None for p in problems for a, _ in p]))


def test_summarize_takes_one_equivalence_per_problem_and_rejects_bad_input():
    problems = [[("0.5", True), ("1/2", True), ("3", False), ("3", False), ("1/2", True)]] * 2
    out = summarize(problems, equivalent=[canon_equal, None])
    assert [r["majority"] for r in out["problems"]] == ["0.5", "1/2"]
    assert out["cons@5"] == 1.0 and out["pass@1"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="no problems"):
        summarize([])
    with pytest.raises(ValueError, match="same number"):
        summarize([[("1", True)], [("1", True), ("2", False)]])
    with pytest.raises(ValueError, match="pass@3"):
        summarize([[("1", True), ("2", False)]], ks=(3,))
    with pytest.raises(ValueError, match="equivalences"):
        summarize(problems, equivalent=[None])


# --------------------------------------------------------------------------------------------------
# sample_eval on a tiny random model
# --------------------------------------------------------------------------------------------------

K, BATCH, NEW = 4, 5, 10  # 3 problems x 4 samples = 12 rows: batches of 5, 5 and 2 (+3 padding rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Qwen2 shape and a small sentencepiece tokenizer (ids < the model's vocab)."""
    cfg = load_config(CONFIGS / "models" / "tiny_qwen2.yaml").model
    graphdef, state = init_model(cfg, jax.random.key(0))
    state = jax.tree.map(lambda x: x * 3 if x.ndim >= 2 else x, state)  # varied predictions
    rng = random.Random(0)
    texts = [f"What is {rng.randint(0, 99)} + {rng.randint(0, 99)}? The answer is {rng.randint(0, 199)}."
             for _ in range(200)]
    tok = Tokenizer.train_sentencepiece(texts, tmp_path_factory.mktemp("tok"), 300)
    assert tok.vocab_size <= cfg.vocab_size
    return graphdef, state, tok


def recording_check(truth):
    """check(record, text) -> truth[record id](text), logging every call."""
    calls = []

    def check(rec, text):
        ok = truth[rec["id"]](text)
        calls.append((rec["id"], text, ok))
        return ok

    return check, calls


def vote(text):
    """A stub answer: the completion length mod 3; no answer when it is a multiple of 5."""
    return None if len(text) % 5 == 0 else str(len(text) % 3)


def run(tiny, records, **kw):
    graphdef, state, tok = tiny
    kw = {"k": K, "max_new_tokens": NEW, "batch_size": BATCH, "keep_completions": K, **kw}
    return sample_eval(graphdef, state, tok, "r1", records, **kw)


SAME = [{"id": f"p{i}", "question": "What is 3 + 4?", "answer": "7"} for i in range(3)]


def test_sample_eval_bookkeeping_and_results_files(tiny, tmp_path):
    truth = {"p0": lambda t: True, "p1": lambda t: len(t) % 2 == 0, "p2": lambda t: False}
    check, calls = recording_check(truth)
    out = run(tiny, SAME, check=check, answer_of=vote, ks=(1, 2))
    assert out["n"] == 3 and out["k"] == K and len(out["problems"]) == 3 and len(calls) == 3 * K
    assert out["sampling"]["temperature"] == 0.6 and out["sampling"]["top_p"] == 0.95
    for rec, row in zip(SAME, out["problems"]):
        mine = [(t, ok) for rid, t, ok in calls if rid == rec["id"]]
        assert len(mine) == K and len(row["samples"]) == K
        assert [s["completion"] for s in row["samples"]] == [t for t, _ in mine]
        assert [s["correct"] for s in row["samples"]] == [ok for _, ok in mine]
        assert [s["answer"] for s in row["samples"]] == [vote(t) for t, _ in mine]
        assert row["n_correct"] == sum(ok for _, ok in mine)
        assert (row["id"], row["question"], row["answer"]) == (rec["id"], rec["question"], rec["answer"])
        answers = [vote(t) for t, _ in mine]
        counts = Counter(a for a in answers if a is not None)
        if counts:
            top = max(counts.values())
            want = next(a for a in answers if a is not None and counts[a] == top)
            assert row["majority"] == want and row["majority_votes"] == top
            assert row["majority_correct"] == mine[answers.index(want)][1]
        else:
            assert row["majority"] is None and not row["majority_correct"]
    rows = out["problems"]
    assert rows[0]["n_correct"] == K and rows[2]["n_correct"] == 0
    assert out["pass@1"] == pytest.approx(np.mean([r["n_correct"] / K for r in rows]))
    assert out["pass@2"] == pytest.approx(np.mean([pass_by_enumeration(K, r["n_correct"], 2) for r in rows]))
    assert out[f"cons@{K}"] == pytest.approx(np.mean([r["majority_correct"] for r in rows]))
    assert out["mean_new_tokens"] > 0 and out["tokens_per_s"] > 0

    path = tmp_path / "deep" / "eval" / "results.jsonl"
    written, summary = write_results(path, out)
    assert written == path and summary == summary_path(path) == path.with_name("results.summary.json")
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == json.loads(json.dumps(rows))
    assert json.loads(summary.read_text()) == json.loads(json.dumps({k: v for k, v in out.items() if k != "problems"}))
    fewer = {**out, "problems": rows[:1]}  # a re-run replaces both files whole, leaving no temporaries
    write_results(path, fewer)
    assert len(path.read_text().splitlines()) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.jsonl", "results.summary.json"]


def test_sample_eval_keys_differ_per_batch_and_follow_the_seed(tiny):
    def texts(out):
        return [s["completion"] for row in out["problems"] for s in row["samples"]]

    first = texts(run(tiny, SAME, check=lambda r, t: False, seed=0))
    # one prompt in every row: were a key reused across batches, rows j of batches 0 and 1 would agree
    assert len(set(first)) > BATCH
    assert texts(run(tiny, SAME, check=lambda r, t: False, seed=0)) == first
    assert texts(run(tiny, SAME, check=lambda r, t: False, seed=1)) != first


def test_sample_eval_greedy_rows_belong_to_their_prompt(tiny):
    graphdef, state, tok = tiny
    records = [{"id": f"q{i}", "question": q, "answer": "7"}
               for i, q in enumerate(["What is 3 + 4?", "What is 12 + 30 + 5?", "Hi"])]
    out = run(tiny, records, temperature=0.0, check=lambda r, t: False)
    for rec, row in zip(records, out["problems"]):
        prompt = encode_prompt(tok, "r1", rec["question"])
        toks, lens = pad_prompts([prompt], len(prompt) + NEW, tok.pad_id)
        res = generate(graphdef, state, toks, lens, jax.random.key(0), max_new_tokens=NEW, eos_id=tok.eos_id,
                       vocab_limit=tok.vocab_size)
        alone = tok.decode(np.asarray(res["tokens"][0, lens[0]:int(res["lengths"][0])]).tolist(), skip_special=True)
        assert [s["completion"] for s in row["samples"]] == [alone] * K, rec["id"]


def test_sample_eval_defaults_score_with_the_accuracy_reward(tiny):
    records = [{"id": "arithmetic:0:test:0", "question": "What is 3 + 4?", "answer": "7"},
               {"id": "gsm8k:1", "question": "What is 1 + 1?", "answer": "2"}]
    out = run(tiny, records, keep_completions=2)
    for rec, row in zip(records, out["problems"]):
        kept = row["samples"][:2]
        assert all("completion" not in s for s in row["samples"][2:])
        for s in kept:
            assert s["correct"] == (accuracy_reward(s["completion"], rec) > 0.5)
            assert s["answer"] == extract_answer(s["completion"])
    assert set(out) >= {"pass@1", f"pass@{K}", f"cons@{K}", "answered", "n", "k", "problems"}


def test_sample_eval_rejects_bad_arguments(tiny):
    with pytest.raises(ValueError, match="no records"):
        run(tiny, [])
    with pytest.raises(ValueError, match="k=0"):
        run(tiny, SAME, k=0)


def test_eval_sets_are_the_shipped_files_and_the_task_test_split():
    """eval.sets: the shipped GSM8K / MATH-500 / AIME 2024 test files (counted here from the files
    themselves) and the procedural test split (never a training problem)."""
    from r1jax.data.procedural import ArithmeticTask
    from r1jax.stages.eval import eval_records

    eval_dir = CONFIGS.parent / "r1jax" / "data" / "eval"
    cfg = load_config(CONFIGS / "tiny_r1" / "eval.yaml")
    for name, file in (("gsm8k", "gsm8k_test.jsonl"), ("math500", "math500.jsonl"),
                       ("aime2024", "aime2024.jsonl")):
        lines = [json.loads(x) for x in (eval_dir / file).read_text().splitlines() if x.strip()]
        got = eval_records(load_config(CONFIGS / "tiny_r1" / "eval.yaml", ["eval.examples=0"]), name)
        assert len(got) == len(lines) and got[0]["question"] == lines[0].get("question", lines[0].get("problem"))
        assert len(eval_records(load_config(CONFIGS / "tiny_r1" / "eval.yaml", ["eval.examples=7"]), name)) == 7
    held = eval_records(cfg, "heldout")
    assert len(held) == cfg.eval.examples
    train = ArithmeticTask(cfg.data.seed, "train", 20000, min_digits=2, max_digits=2)
    train_questions = {train[i]["question"] for i in range(20000)}
    assert all(r["id"].split(":")[2] == "test" and r["question"] not in train_questions for r in held)
    assert all("target_answer" not in r for r in held)  # flawed demonstrations are training-only


def _reward_worker_dirs():
    import glob
    import os
    import tempfile

    return set(glob.glob(os.path.join(tempfile.gettempdir(), "r1jax-reward-worker-*")))


def test_sample_eval_scores_in_reward_worker_processes(tiny, private_tmp):
    """The default scoring is not done in this process: with this process's accuracy reward broken,
    the verdicts are still the accuracy reward's (computed in the workers), counted in "scoring", and
    the workers are gone afterwards."""
    from r1jax.rewards import accuracy as acc
    from r1jax.rewards import combine

    def broken(*args, **kwargs):
        raise AssertionError("scored in the evaluating process")

    records = [{"id": "arithmetic:0:test:0", "question": "What is 3 + 4?", "answer": "7"},
               {"id": "gsm8k:1", "question": "What is 1 + 1?", "answer": "2"}]
    dirs = _reward_worker_dirs()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(combine, "score_components", broken)
        mp.setattr(acc, "accuracy_reward", broken)
        out = run(tiny, records)
    assert out["scoring"]["completions"] == len(records) * K
    assert out["scoring"]["timeouts"] == out["scoring"]["crashes"] == 0
    assert 0 < out["scoring"]["worker_peak_rss_mb"] < 2048
    for rec, row in zip(records, out["problems"]):
        for s in row["samples"]:
            assert s["correct"] == (accuracy_reward(s["completion"], rec) > 0.5)
    assert _reward_worker_dirs() == dirs  # the scorer it started was closed


def test_greedy_accuracy_and_sample_eval_use_a_given_scorer(tiny):
    from r1jax.evaluate import greedy_accuracy

    graphdef, state, tok = tiny
    calls = []

    def scorer(completions, records):  # right iff the completion has an even length
        calls.append(len(completions))
        return {"accuracy": np.asarray([float(len(c) % 2 == 0) for c in completions])}

    out = run(tiny, SAME, scorer=scorer)
    assert calls == [len(SAME) * K] and out["scoring"] is None  # one batched call; no stats to report
    for row in out["problems"]:
        assert [s["correct"] for s in row["samples"]] == [len(s["completion"]) % 2 == 0 for s in row["samples"]]
    calls.clear()
    greedy = greedy_accuracy(graphdef, state, tok, "r1", SAME, NEW, batch_size=2, scorer=scorer)
    assert calls == [2, 1]  # one call per decoded batch
    assert greedy["accuracy"] == pytest.approx(np.mean([s["correct"] for s in greedy["samples"]]))
    assert all(s["correct"] == (len(s["completion"]) % 2 == 0) for s in greedy["samples"])
