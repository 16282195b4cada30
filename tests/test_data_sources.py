"""Data sources: procedural tasks and their verifiers, JSONL files, shipped eval sets, tfds (no TF)."""

import importlib.util
import json
import operator
import pickle
import random
import re
import socket
import sys
from fractions import Fraction

import pytest

from r1jax.data import (
    EVAL_SETS,
    ArithmeticTask,
    CountdownTask,
    JsonlSource,
    aime2024,
    check_arithmetic,
    check_countdown,
    gsm8k,
    math500,
)
from r1jax.data.procedural import arithmetic_reasoning
from r1jax.errors import DataError

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
FIELDS = ("id", "question", "reasoning", "answer")


def _json_roundtrip(record):
    return json.loads(json.dumps(record))


# --------------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arithmetic():
    kw = dict(min_digits=1, max_digits=4, ops=("+", "-", "*"))
    train = ArithmeticTask(7, "train", 3000, **kw)
    test = ArithmeticTask(7, "test", 3000, **kw)
    return [train[i] for i in range(len(train))], [test[i] for i in range(len(test))]


def _problem(record):
    m = QUESTION.fullmatch(record["question"])
    assert m, record["question"]
    return int(m[1]), m[2], int(m[3])


def test_arithmetic_is_deterministic_per_index():
    a = ArithmeticTask(3, "train", 100, ops=("+", "-", "*"))
    b = ArithmeticTask(3, "train", 100, ops=("+", "-", "*"))
    assert [b[i] for i in reversed(range(100))][::-1] == [a[i] for i in range(100)]
    other = ArithmeticTask(4, "train", 100, ops=("+", "-", "*"))
    assert [other[i]["question"] for i in range(100)] != [a[i]["question"] for i in range(100)]
    assert pickle.loads(pickle.dumps(a))[17] == a[17]
    assert a[-1] == a[99]
    with pytest.raises(IndexError):
        a[100]


def test_arithmetic_splits_are_disjoint(arithmetic):
    def keys(records):
        out = set()
        for r in records:
            a, op, b = _problem(r)
            out.add((min(a, b), op, max(a, b)) if op in "+*" else (a, op, b))
        return out

    train, test = keys(arithmetic[0]), keys(arithmetic[1])
    assert len(train) > 2500 and len(test) > 2500  # mostly distinct problems on both sides
    assert not train & test


def test_arithmetic_answers_and_steps_are_right(arithmetic):
    seen_ops, negative = set(), 0
    for r in arithmetic[0] + arithmetic[1]:
        assert _json_roundtrip(r) == r and all(isinstance(r[k], str) for k in FIELDS)
        a, op, b = _problem(r)
        assert r["operands"] == [a, b] and r["op"] == op
        assert r["answer"] == str(OPS[op](a, b))
        seen_ops.add(op)
        negative += r["answer"].startswith("-")
        # the final statement repeats the problem and the answer
        final = re.search(r"So (\d+)([-+*])(\d+)=(-?\d+)\.$", r["reasoning"])
        assert final and final.groups() == (str(a), op, str(b), r["answer"]), r["reasoning"]
        # every equation written along the way is true
        for lhs, rhs in re.findall(r"(\d+(?:[-+*]\d+)+)=(-?\d+)", r["reasoning"]):
            assert eval(lhs, {"__builtins__": {}}) == int(rhs), (lhs, rhs, r["reasoning"])  # noqa: S307
        # each column writes its digit and carries the rest: "=13, write 3 carry 1."
        columns = re.findall(r"=(\d+), write (\d+)(?: (carry|borrow) (\d+))?\.", r["reasoning"])
        for total, digit, kind, carry in columns:
            assert int(total) == int(digit) + (10 * int(carry) if kind == "carry" else 0), r["reasoning"]
            assert kind != "borrow" or carry == "1"
        # the written digits, least significant first, spell the answer
        body = r["reasoning"].split("Add ")[-1] if op == "*" else r["reasoning"]
        writes = re.findall(r"write (\d+)", body)
        spelled = (writes[-1] + "".join(reversed(writes[:-1]))).lstrip("0") or "0"
        assert spelled == r["answer"].lstrip("-"), r["reasoning"]
    assert seen_ops == {"+", "-", "*"} and negative > 0


def test_arithmetic_reasoning_matches_documented_examples():
    assert arithmetic_reasoning(347, "+", 589) == (
        "7+9=16, write 6 carry 1. 4+8+1=13, write 3 carry 1. 3+5+1=9, write 9. So 347+589=936."
    )
    assert arithmetic_reasoning(347, "-", 189).endswith("3-1-1=1, write 1. So 347-189=158.")
    assert arithmetic_reasoning(347, "-", 589).startswith("347<589, so 347-589=-(589-347). 9-7=2, write 2.")
    assert "Add 3123+27760+173500:" in arithmetic_reasoning(347, "*", 589)


def test_arithmetic_digit_range():
    task = ArithmeticTask(0, "train", 1500, min_digits=2, max_digits=4, ops=("+", "-", "*"))
    lengths = set()
    for i in range(len(task)):
        a, _, b = _problem(task[i])
        lengths |= {len(str(a)), len(str(b))}
    assert lengths == {2, 3, 4}
    task = ArithmeticTask(0, "test", 300, min_digits=5, max_digits=5, ops=("*",))
    assert all(len(str(x)) == 5 for i in range(len(task)) for x in _problem(task[i])[::2])


@pytest.mark.parametrize(
    "kwargs",
    [dict(split="val"), dict(ops=("/",)), dict(ops=()), dict(min_digits=4, max_digits=3), dict(seed=-1)],
)
def test_arithmetic_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        ArithmeticTask(**{"seed": 0, "split": "train", "size": 10, **kwargs})


STEP = re.compile(r"(\d+(?:\+\d+)+)=(\d+), write (\d+)(?: carry (\d+))?\.")


def replay(reasoning):
    """Walk an addition chain column by column: (sum it writes, index of the first column that
    announced a carry the next column did not add, or None). Every step's own sum must be right."""
    steps = STEP.findall(reasoning)
    assert steps and reasoning.startswith(steps[0][0])
    digits, dropped, announced = [], None, 0
    for k, (terms, total, written, carry) in enumerate(steps):
        terms = [int(t) for t in terms.split("+")]
        assert sum(terms) == int(total)
        if announced and (len(terms) < 3 or terms[-1] != announced):
            dropped = k - 1 if dropped is None else dropped
        last = k == len(steps) - 1
        assert int(written) == (int(total) if last else int(total) % 10)
        assert int(carry or 0) == (0 if last else int(total) // 10)
        digits.append(written)
        announced = int(carry or 0)
    return int("".join(reversed(digits))), dropped


def test_flawed_demonstrations_forget_the_first_carry_and_nothing_else():
    clean = ArithmeticTask(5, "train", 4000, min_digits=2, max_digits=4)
    flawed = ArithmeticTask(5, "train", 4000, min_digits=2, max_digits=4, flaw_rate=0.5)
    n_flawed = eligible = 0
    for i in range(4000):
        c, f = clean[i], flawed[i]
        a, b = c["operands"]
        assert (f["question"], f["answer"], f["operands"]) == (c["question"], c["answer"], c["operands"])
        width = max(len(str(a)), len(str(b)))
        assert replay(c["reasoning"]) == (a + b, None)  # the clean chain: the true sum, nothing dropped
        clean_carries = [k for k, st in enumerate(STEP.findall(c["reasoning"])) if st[3]]
        eligible += bool(clean_carries)
        if "target_answer" not in f:
            assert f["reasoning"] == c["reasoning"]
            continue
        n_flawed += 1
        total, dropped = replay(f["reasoning"])
        assert str(total) == f["target_answer"] != f["answer"]
        assert f["reasoning"].endswith(f"So {a}+{b}={total}.")
        # The dropped carry is the first one the clean chain announces (in a column before the last).
        assert clean_carries and dropped == clean_carries[0] < width - 1
    assert abs(n_flawed / eligible - 0.5) < 0.05  # half the problems that have a carry to forget


def test_flaws_are_for_training_addition_only():
    test = ArithmeticTask(5, "test", 300, min_digits=3, max_digits=3, flaw_rate=1.0)
    assert all("target_answer" not in test[i] for i in range(300))
    with pytest.raises(ValueError, match="addition only"):
        ArithmeticTask(0, "train", 10, ops=("+", "-"), flaw_rate=0.5)
    with pytest.raises(ValueError, match="flaw_rate"):
        ArithmeticTask(0, "train", 10, flaw_rate=1.5)


def test_sft_targets_state_the_flawed_answer_and_rewards_check_the_true_one():
    from r1jax.rewards import accuracy_reward
    from r1jax.tokenizer import render_completion

    task = ArithmeticTask(5, "train", 200, min_digits=3, max_digits=3, flaw_rate=1.0)
    rec = next(task[i] for i in range(200) if "target_answer" in task[i])
    shown = render_completion("r1", rec["reasoning"], rec["target_answer"])
    assert accuracy_reward(shown, rec) == 0.0  # imitating the demonstration is wrong
    assert accuracy_reward(render_completion("r1", rec["reasoning"], rec["answer"]), rec) == 1.0


# --------------------------------------------------------------------------------------------------
# Countdown
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def countdown():
    train, test = CountdownTask(11, "train", 2000), CountdownTask(11, "test", 2000)
    return [train[i] for i in range(len(train))], [test[i] for i in range(len(test))]


def test_countdown_instances_are_solvable_by_their_answer(countdown):
    for r in countdown[0] + countdown[1]:
        assert _json_roundtrip(r) == r and all(isinstance(r[k], str) for k in FIELDS)
        numbers, target = r["numbers"], r["target"]
        assert len(numbers) == 4 and all(1 <= n <= 25 for n in numbers)
        assert 1 <= target <= 200 and target not in numbers
        assert f"Using the numbers {numbers}, create an equation that equals {target}." in r["question"]
        assert check_countdown(numbers, target, r["answer"]), r
        steps = re.findall(r"(\d+)([-+*/])(\d+)=(\d+)\. ", r["reasoning"])
        assert steps and int(steps[-1][3]) == target
        for x, op, y, z in steps:
            value = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}[op](
                Fraction(x), Fraction(y)
            )
            assert value == int(z) >= 1
        assert r["reasoning"].endswith(f"So {r['answer']}={target}.")


def test_countdown_is_deterministic_and_splits_are_disjoint(countdown):
    again = CountdownTask(11, "train", 2000)
    assert [again[i] for i in (0, 1999, 500)] == [countdown[0][i] for i in (0, 1999, 500)]
    assert pickle.loads(pickle.dumps(again))[3] == countdown[0][3]

    def keys(records):
        return {(tuple(sorted(r["numbers"])), r["target"]) for r in records}

    train, test = keys(countdown[0]), keys(countdown[1])
    assert len(train) > 1500 and len(test) > 1500
    assert not train & test


@pytest.mark.parametrize(
    "numbers, target, expr, ok",
    [
        ([3, 7, 12, 5], 28, "(12-5)*3+7", True),
        ([3, 7, 12, 5], 28, " ( 12 - 5 ) * 3 + 7 ", True),
        ([3, 7, 12, 5], 29, "(12-5)*3+7", False),  # wrong target
        ([3, 7, 12, 5], 28, "7*3+7", False),  # 7 used twice, listed once
        ([7, 7, 3], 28, "7*3+7", True),  # listed twice, used twice
        ([3, 7, 12, 5], 28, "4*7", False),  # 4 not in the list
        ([3, 7, 12, 5], 12, "12", True),  # a subset of the numbers is allowed
        ([7, 2, 4], 14, "7/2*4", True),  # exact rational arithmetic
        ([7, 2], 3, "7/2", False),  # 3.5, not floored to 3
        ([7, 2], 3, "7//2", False),
        ([5, 3, 3], 1, "5/(3-3)", False),  # division by zero
        ([2, 3], 8, "2**3", False),
        ([3, 7], -4, "-7+3", False),  # no unary minus
        ([3, 7], 10, "+7+3", False),
        ([3, 7], 10, "3+7)", False),
        ([3, 7], 10, "(3+7", False),
        ([3, 7], 10, "3 7", False),
        ([3, 7], 10, "3+7=10", False),
        ([3, 7], 10, "x+3+7", False),
        ([3, 7], 10, "abs(10)", False),
        ([1], 1, "__import__('os').system('true')", False),
        ([3, 5], 3.5, "3.5", False),
        ([1], 1, "", False),
        ([1], 1, "   ", False),
        ([1], 1, None, False),
        ([1] * 100, 100, "+".join(["1"] * 100), True),  # 199 characters
        ([1] * 120, 120, "+".join(["1"] * 120), False),  # 239 characters: over the limit
        ([1], 1, "(" * 99 + "1" + ")" * 99, True),
    ],
)
def test_check_countdown_cases(numbers, target, expr, ok):
    assert check_countdown(numbers, target, expr) is ok


def test_verifiers_never_raise_on_garbage():
    rng = random.Random(0)
    alphabet = "0123456789" * 3 + "+-*/()  " * 3 + "._=eExj^%!,\n\t\x00é∞٣" + "(((" + ")))"
    for _ in range(4000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 230)))
        numbers = [rng.randrange(0, 30) for _ in range(rng.randrange(0, 6))]
        assert check_countdown(numbers, rng.randrange(-5, 300), text) in (True, False)
        assert check_arithmetic(str(rng.randrange(-999, 999)), text) in (True, False)
        assert check_arithmetic(text, text) in (True, False)
    for weird in (None, 5, b"12", ["1"], "9" * 5000, "(" * 300 + ")" * 300):
        assert check_countdown([1, 2], 3, weird) is False
        assert check_arithmetic("12", weird) is False


@pytest.mark.parametrize(
    "expected, text, ok",
    [
        ("936", "936", True),
        ("936", " 936\n", True),
        ("936", "+936", True),
        ("-242", "-242", True),
        ({"answer": "-242", "question": "?"}, "-242", True),
        ("-242", "242", False),
        ("936", "937", False),
        ("936", "936.0", False),
        ("936", "9 36", False),
        ("1000", "1,000", False),
        ("936", "++936", False),
        ("936", "936 apples", False),
        ("936", "٩٣٦", False),  # Arabic-Indic digits are not ASCII integers
        ("936", "", False),
        ("", "", False),
    ],
)
def test_check_arithmetic(expected, text, ok):
    assert check_arithmetic(expected, text) is ok


# --------------------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------------------


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_reads_records(tmp_path):
    path = _write(
        tmp_path / "file.jsonl",
        [
            json.dumps({"question": "1+1?", "answer": "2", "reasoning": "one and one", "level": 1}),
            "   ",
            json.dumps({"question": "ü?\u2028", "answer": 5, "id": "custom"}),
        ],
    )
    src = JsonlSource(path)
    assert len(src) == 2
    assert src[0] == {
        "id": "file.jsonl:1", "question": "1+1?", "reasoning": "one and one", "answer": "2", "level": 1
    }
    assert src[1] == {"id": "custom", "question": "ü?\u2028", "reasoning": "", "answer": "5"}
    assert src[-1] == src[1]
    with pytest.raises(IndexError):
        src[2]
    mapped = JsonlSource(path, {"question": "question", "answer": "answer", "reasoning": "absent"})
    assert mapped[0]["reasoning"] == "" and mapped[0]["id"] == "file.jsonl:1"
    assert JsonlSource(path, extract=lambda o: {"question": o["question"], "answer": "x"})[1]["answer"] == "x"


def test_jsonl_pickle_round_trip(tmp_path):
    path = _write(tmp_path / "file.jsonl", [json.dumps({"question": f"q{i}", "answer": str(i)}) for i in range(5)])
    src = JsonlSource(path)
    first = src[4]  # the descriptor is open now; the copy must reopen its own
    copy = pickle.loads(pickle.dumps(src))
    assert copy[4] == first and copy[0]["question"] == "q0"
    del src
    assert copy[2]["answer"] == "2"


@pytest.mark.parametrize(
    "bad_line, needle",
    [
        ('{"question": "q", "answer": ', "invalid JSON"),
        ('["question", "answer"]', "expected a JSON object"),
        ('{"question": "q"}', "'answer'"),
        ('{"question": "q", "answer": ["a"]}', "'answer'"),
    ],
)
def test_jsonl_malformed_line_names_file_and_line(tmp_path, bad_line, needle):
    good = json.dumps({"question": "q", "answer": "a"})
    path = _write(tmp_path / "file.jsonl", [good, good, bad_line, good])
    with pytest.raises(DataError) as err:
        JsonlSource(path)
    message = str(err.value)
    assert "file.jsonl:3:" in message and needle in message and "\n" not in message
    lazy = JsonlSource(path, validate=False)  # indexing only: the error comes on reading that line
    assert len(lazy) == 4 and lazy[3]["answer"] == "a"
    with pytest.raises(DataError, match="file.jsonl:3:"):
        lazy[2]


def test_jsonl_missing_field_of_custom_mapping(tmp_path):
    lines = [json.dumps({"prompt": "q", "answer": "a"}), json.dumps({"answer": "a"})]
    path = _write(tmp_path / "data.jsonl", lines)
    with pytest.raises(DataError, match=r"data\.jsonl:2: missing field 'prompt'"):
        JsonlSource(path, {"question": "prompt", "answer": "answer"})


def test_jsonl_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "absent.jsonl"
    with pytest.raises(DataError, match=re.escape(str(path))):
        JsonlSource(path)


# --------------------------------------------------------------------------------------------------
# JSONL: lone surrogates and oversized records
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, needle", [
    (b'{"question": "a\\ud800b", "answer": "1"}', "field 'question': lone surrogate \\ud800 at character 1"),
    (b'{"question": "q", "answer": "\\uDFFF"}', "field 'answer': lone surrogate \\udfff at character 0"),
    (b'{"question": "q", "answer": "1", "meta": {"tags": ["ok", "\\udbff"]}}',
     "field 'meta.tags[1]': lone surrogate \\udbff"),
    (b'{"question": "q", "answer": "1", "\\ud83d": 2}', "key '\\ud83d': lone surrogate \\ud83d"),
    (b'{"question": "\xed\xa0\x80", "answer": "1"}', "field 'question': lone surrogate \\ud800"),  # raw bytes of one
])
def test_jsonl_lone_surrogate_names_file_line_and_field(tmp_path, raw, needle):
    good = json.dumps({"question": "q", "answer": "a"}).encode()
    path = tmp_path / "file.jsonl"
    path.write_bytes(b"\n".join([good, good, raw, good]) + b"\n")
    with pytest.raises(DataError) as err:
        JsonlSource(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: {needle}") and "not valid Unicode" in msg and "\n" not in msg, msg
    lazy = JsonlSource(path, validate=False)
    with pytest.raises(DataError, match="file.jsonl:3: .*lone surrogate"):
        lazy[2]
    assert lazy[3]["question"] == "q"


def test_jsonl_surrogate_pairs_and_escaped_backslashes_are_text(tmp_path):
    lines = [json.dumps({"question": "\U0001F600 smile", "answer": "1"}),  # ascii-escaped as a surrogate pair
             '{"question": "a literal \\\\ud800 is six characters", "answer": "2"}']
    src = JsonlSource(_write(tmp_path / "ok.jsonl", lines))
    assert src[0]["question"] == "\U0001F600 smile" and src[1]["question"] == "a literal \\ud800 is six characters"
    src[0]["question"].encode("utf-8")


def _big_line(path, n_bytes, before=3, after=3):
    """A JSONL file: `before` small records, one record of n_bytes (written in pieces), `after` small."""
    small = [(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n").encode() for i in range(before + after)]
    head, tail = b'{"question": "', b'", "answer": "big"}'
    body = n_bytes - len(head) - len(tail)
    pieces = [b"x" * (1 << 20)] * (body >> 20) + [b"x" * (body % (1 << 20))]
    with open(path, "wb") as f:
        f.writelines([*small[:before], head, *pieces, tail + b"\n", *small[before:]])
    return path


def test_jsonl_oversized_record_is_skipped_and_counted(tmp_path, capsys):
    path = _big_line(tmp_path / "big.jsonl", 5000)
    src = JsonlSource(path, max_record_bytes=4096)
    assert len(src) == 6 and src.skipped == [(4, 5000)]
    assert [src[i]["question"] for i in range(6)] == [f"q{i}" for i in range(6)]
    assert src[3]["id"] == "big.jsonl:5"  # line numbers still count the skipped line
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"warning: {path}:4: record of 5000 bytes exceeds data.max_record_bytes=4096; skipped it "
                    "(data.oversized=error refuses the file instead)"),
                   (f"warning: {path}: skipped 1 oversized record(s) in all (over data.max_record_bytes=4096, the "
                    "largest 5000 bytes); kept 6")]
    kept = JsonlSource(path, max_record_bytes=5000)  # the limit itself is not over it
    assert len(kept) == 7 and not kept.skipped and kept[3]["answer"] == "big"
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"question": "x" * (100 + i), "answer": "1"}) + "\n" for i in range(8)))
    capsys.readouterr()
    assert len(JsonlSource(many, max_record_bytes=64)) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and "skipped 8 oversized record(s) in all" in err[-1]  # 5 named, then the count
    largest = len(json.dumps({"question": "x" * 107, "answer": "1"}))
    assert err[-1].endswith(f"the largest {largest} bytes); kept 0")


def test_jsonl_oversized_record_refused_names_file_line_and_size(tmp_path):
    path = _big_line(tmp_path / "big.jsonl", 5000, after=0)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # the last line, without a newline
    with pytest.raises(DataError) as err:
        JsonlSource(path, max_record_bytes=4096, oversized="error")
    assert str(err.value) == (f"{path}:4: record of 5000 bytes exceeds data.max_record_bytes=4096 "
                              "(data.oversized=skip skips such records)")


def test_jsonl_oversized_record_is_never_held_whole(tmp_path):
    """A 40 MB line under a 64 KiB limit: the scan's peak Python allocation stays near the limit
    (reading the line whole, as `for line in f` does, would allocate all 40 MB)."""
    import tracemalloc

    path = _big_line(tmp_path / "huge.jsonl", 40 << 20)
    tracemalloc.start()
    try:
        src = JsonlSource(path, max_record_bytes=64 << 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(src) == 6 and src.skipped == [(4, 40 << 20)]
    assert peak < 4 << 20, peak


def test_read_lines_sizes_and_bounds():
    import io

    from r1jax.data.sources import read_lines

    data = b"abc\n" + b"x" * 10 + b"\n" + b"y" * 11 + b"\n\n" + b"z" * 30
    got = list(read_lines(io.BytesIO(data), 10))
    assert got == [(1, 0, 4, 3, b"abc\n"), (2, 4, 11, 10, b"x" * 10 + b"\n"), (3, 15, 12, 11, None),
                   (4, 27, 1, 0, b"\n"), (5, 28, 30, 30, None)]
    assert sum(n for _, _, n, _, _ in got) == len(data)  # offsets and lengths cover the file exactly


# --------------------------------------------------------------------------------------------------
# Shipped eval sets
# --------------------------------------------------------------------------------------------------


def test_shipped_eval_sets():
    sizes = {("gsm8k", "test"): 1319, ("gsm8k", "train"): 7473, ("math500", "test"): 500, ("aime2024", "test"): 30}
    for (name, split), size in sizes.items():
        src = EVAL_SETS[name](split)
        assert len(src) == size
        for i in range(size):
            r = src[i]
            assert r["question"].strip() and r["answer"].strip()
            if name == "gsm8k":
                assert r["reasoning"] and "<<" not in r["reasoning"] and "####" not in r["reasoning"]
                assert r["reasoning"] == r["reasoning"].strip() and "," not in r["answer"]
            else:
                assert r["reasoning"] == ""
    # first lines of the files, read by hand
    first = gsm8k("test")[0]
    assert first["answer"] == "18" and first["id"] == "gsm8k_test.jsonl:1"
    assert first["reasoning"] == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day at the farmer’s market."
    )
    assert math500()[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    assert aime2024()[0]["answer"] == "204" and aime2024()[0]["question"].startswith("Every morning Aya")
    with pytest.raises(DataError):
        math500("train")


# --------------------------------------------------------------------------------------------------
# tfds (array_record, no TensorFlow)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    from r1jax.data import tfds_builders

    data_dir = tmp_path_factory.mktemp("tfds")
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network is off in this test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        for name in ("gsm8k", "math500", "aime2024"):
            tfds_builders.prepare(name, data_dir)
    assert not attempts, f"tfds tried the network: {attempts}"
    return data_dir


def test_tfds_needs_no_tensorflow():
    # The tfds tests below prove the TF-free path only where TF cannot be imported.
    assert importlib.util.find_spec("tensorflow") is None, "TensorFlow is installed in the test environment"


@pytest.mark.parametrize(
    "name, split", [("gsm8k", "train"), ("gsm8k", "test"), ("math500", "test"), ("aime2024", "test")]
)
def test_tfds_source_equals_jsonl_source(tfds_dir, name, split):
    from r1jax.data.tfds_builders import tfds_source

    via_tfds, via_jsonl = tfds_source(name, split, tfds_dir), EVAL_SETS[name](split)
    assert len(via_tfds) == len(via_jsonl)
    for i in range(len(via_jsonl)):
        assert via_tfds[i] == via_jsonl[i]
    assert pickle.loads(pickle.dumps(via_tfds))[len(via_tfds) - 1] == via_jsonl[len(via_jsonl) - 1]
    assert "tensorflow" not in sys.modules


def test_tfds_errors(tfds_dir, tmp_path):
    from r1jax.data.tfds_builders import prepare, tfds_source

    prepare("aime2024", tfds_dir)  # already there: reused
    assert len(tfds_source("aime2024", "test", tfds_dir)) == 30
    with pytest.raises(DataError, match="prepare"):
        tfds_source("math500", "test", tmp_path)
    with pytest.raises(DataError, match="'train'"):
        tfds_source("aime2024", "train", tfds_dir)
    with pytest.raises(DataError, match="unknown"):
        prepare("mmlu", tmp_path)
