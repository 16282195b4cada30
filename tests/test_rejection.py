"""Rejection sampling (R1 section 2.3.3): judge, select, mix, write_dataset, run_rejection.

A stub policy returns completions whose fate is known by construction (the CASES table names the
expected reason of each); the tests check that exactly those are kept, every other one is rejected
for its reason, and that the written dataset reads back through the SFT stage's sources.
"""

import dataclasses
import functools
import json
import os
import pickle
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from r1jax.config import ConfigError, DataConfig
from r1jax.data.pipeline import EncodeSFT, make_source
from r1jax.data.procedural import ArithmeticTask
from r1jax.errors import DataError
from r1jax import rejection
from r1jax.rejection import (CHECK_ORDER, REASONS, RejectionSettings, judge, mix, run_rejection, select,
                                   split_completion, write_dataset)

SETTINGS = RejectionSettings(samples_per_prompt=12, prompts_per_batch=2, min_language_consistency=0.9,
                             min_reasoning_chars=10, max_reasoning_chars=400, max_paragraph_chars=150, non_reasoning_ratio=0.25)
GOOD = "First I read the question carefully. Then I compute the result step by step."
OTHER = "Another route: check the units first, then compute."
PARAS = ["Split the problem into parts and solve each part on its own before combining them together again.",
         "Now combine the partial results, keeping track of every carry so nothing is lost along the way here.",
         "Finally check the result against a rough estimate of the size of the answer to catch any slip ups."]


def wrong(answer: str) -> str:
    return answer + "1"  # a different number for every numeric reference used here


# (name, completion for reference answer a, reason it must get, kept reasoning/answer if accepted)
CASES = [
    ("good", lambda a: f" <think> {GOOD} </think> <answer> {a} </answer>", "ok", lambda a: (GOOD, a)),
    ("good_boxed", lambda a: f"<think>\n{OTHER}\n</think>\n<answer> \\boxed{{{a}}} </answer>\n", "ok",
     lambda a: (OTHER, f"\\boxed{{{a}}}")),
    ("paragraphs", lambda a: " <think> " + "\n\n".join(PARAS) + " </think> <answer> " + a + " </answer>", "ok",
     lambda a: ("\n\n".join(PARAS), a)),
    ("duplicate", lambda a: f"  <think>{GOOD.replace(' ', '  ')}\n</think>   <answer>{a}</answer> ", "duplicate", None),
    ("wrong", lambda a: f" <think> {GOOD} </think> <answer> {wrong(a)} </answer>", "incorrect", None),
    ("no_think", lambda a: f"<answer> {a} </answer>", "format", None),
    ("trailing_text", lambda a: f" <think> {GOOD} </think> <answer> {a} </answer> and more", "format", None),
    ("mixed_language", lambda a:
     f" <think> 首先 我们 计算 这个 问题 的 结果 then check it </think> <answer> {a} </answer>",
     "language", None),
    ("too_short", lambda a: f" <think> ok </think> <answer> {a} </answer>", "length", None),
    ("too_long", lambda a: " <think> " + "\n\n".join(["step by step"] * 40) + f" </think> <answer> {a} </answer>",
     "length", None),
    ("code_block", lambda a: f" <think> Compute it:\n```python\nprint(2 + 2)\n```\n </think> <answer> {a} </answer>",
     "code", None),
    ("long_paragraph", lambda a: " <think> " + "word " * 40 + f"</think> <answer> {a} </answer>", "paragraph", None),
]
KEPT_PER_PROMPT = sum(reason == "ok" for _, _, reason, _ in CASES)


def records():
    return [
        {"id": "mathset:1", "question": "What is 5 + 7?", "answer": "12"},
        {"id": "mathset:2", "question": "What is 3 + 4?", "answer": "7"},
        {"id": "h1", "source": "handmade", "question": "Half of one?", "answer": "0.5"},
        *[ArithmeticTask(0, "train", 2)[i] for i in range(2)],
    ]


def stub_policy(batch, k):
    assert k == len(CASES)
    return [[make(str(r["answer"])) for _, make, _, _ in CASES] for r in batch]


def expected_reasons():
    return Counter(reason for _, _, reason, _ in CASES if reason != "ok")


# --------------------------------------------------------------------------------------------------
# judge
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, make, reason, _", CASES, ids=[c[0] for c in CASES])
def test_judge_each_case(name, make, reason, _):
    record = records()[0]
    if reason == "duplicate":  # a duplicate is fine alone; select rejects it against the first one
        reason = "ok"
    assert judge(make(record["answer"]), record, SETTINGS, "r1_zero") == (reason == "ok", reason)


def test_first_failing_check_decides():
    r = records()[0]
    a, bad = r["answer"], wrong(r["answer"])
    cases = {
        "format": f"<answer> {bad} </answer>",  # no <think> and wrong
        "incorrect": f" <think> 首先 我们 计算 这个 问题 </think> <answer> {bad} </answer>",  # wrong, mixed
        "language": " <think> " + "首先 我们 计算 " * 50 + f"</think> <answer> {a} </answer>",  # mixed, too long
        "length": " <think> " + "a b " * 120 + f"```\ncode\n``` </think> <answer> {a} </answer>",  # long, code
        "code": " <think> " + "w " * 100 + f"\n```\nx\n```\n </think> <answer> {a} </answer>",  # code, paragraph
    }
    assert list(cases) == [c for c in CHECK_ORDER if c in cases]  # listed in the documented order
    for reason, completion in cases.items():
        assert judge(completion, r, SETTINGS, "r1_zero") == (False, reason), reason


def test_filters_turn_off():
    r = records()[0]
    loose = dataclasses.replace(SETTINGS, reject_code_blocks=False, max_paragraph_chars=0, max_reasoning_chars=0,
                                min_language_consistency=0.0)
    for name, make, reason, _ in CASES:
        if reason in ("code", "paragraph", "language") or name == "too_long":
            assert judge(make(r["answer"]), r, loose, "r1_zero") == (True, "ok"), name


def test_without_required_format():
    r = records()[0]
    free = dataclasses.replace(SETTINGS, require_format=False)
    assert judge(f"I add them and get \\boxed{{{r['answer']}}} as the result.", r, free, "r1_zero") == (True, "ok")
    assert split_completion("I add them and get \\boxed{12}.") == ("I add them and get \\boxed{12}.", "12")
    assert judge(f"Thinking aloud about it for a while: {GOOD}", r, free, "r1_zero") == (False, "no_answer")
    # a stray tag would end up nested inside the SFT text
    assert judge(f"<think> {GOOD} <answer> x </think> <answer> 12 </answer>", r, free, "r1_zero") == (False, "format")


def test_r1_template_layout():
    r = records()[0]
    completion = f"<think>\n{GOOD}\n</think>\nSo the sum is twelve. <answer> 12 </answer>."
    assert judge(completion, r, SETTINGS, "r1") == (True, "ok")
    assert judge(completion, r, SETTINGS, "r1_zero") == (False, "format")  # r1_zero allows no summary
    assert split_completion(completion) == (GOOD, "12")


def test_code_record_is_scored_by_tests_and_may_answer_with_code():
    r = {"id": "code:1", "question": "Print three.", "tests": [{"input": "", "output": "3\n"}]}
    right = f" <think> {GOOD} </think> <answer>\n```python\nprint(3)\n```\n</answer>"
    assert judge(right, r, SETTINGS, "r1_zero") == (True, "ok")  # the code filter reads the CoT only
    assert judge(right.replace("print(3)", "print(4)"), r, SETTINGS, "r1_zero") == (False, "incorrect")
    assert judge(f" <think> {GOOD} </think> <answer> three </answer>", r, SETTINGS, "r1_zero") == (False, "incorrect")


def test_bad_settings_and_template():
    r = records()[0]
    with pytest.raises(ConfigError, match="rejection.samples_per_prompt"):
        judge("x", r, RejectionSettings(samples_per_prompt=0), "r1_zero")
    with pytest.raises(ConfigError, match="rejection.target_language"):
        judge("x", r, RejectionSettings(target_language="xx"), "r1_zero")
    with pytest.raises(ConfigError, match="template"):
        judge("x", r, SETTINGS, "chatml")


# --------------------------------------------------------------------------------------------------
# select
# --------------------------------------------------------------------------------------------------

def test_select_keeps_exactly_the_good_ones_and_counts_reasons():
    recs = records()
    samples = list(zip(recs, stub_policy(recs, len(CASES)), strict=True))
    kept, report = select(samples, SETTINGS, "r1_zero")

    expected = []
    for r in recs:
        for j, (_, _, reason, fields) in enumerate(CASES):
            if reason == "ok":
                reasoning, answer = fields(str(r["answer"]))
                expected.append((f"{r['id']}#{j}", reasoning, answer))
    assert [(e["id"], e["reasoning"], e["answer"]) for e in kept] == expected
    for e in kept:
        r = next(r for r in recs if e["prompt_id"] == r["id"])
        assert e["question"] == r["question"] and e["reference_answer"] == str(r["answer"])
    assert kept[-1]["operands"] == recs[-1]["operands"]  # extras travel along

    per_source = {"mathset": 2, "handmade": 1, "arithmetic": 2}
    assert sorted(report["sources"]) == sorted(per_source)
    for source, n in [*per_source.items(), ("total", 5)]:
        row = report["total"] if source == "total" else report["sources"][source]
        assert row["samples"] == n * len(CASES)
        assert row["accepted"] == n * KEPT_PER_PROMPT
        assert row["acceptance_rate"] == pytest.approx(KEPT_PER_PROMPT / len(CASES))
        assert row["prompts"] == row["prompts_with_kept"] == n
        assert row["rejected"] == {reason: n * expected_reasons()[reason] for reason in REASONS}


def test_dedupe_and_cap():
    r = records()[0]
    comps = [make(r["answer"]) for _, make, _, _ in CASES]
    kept, report = select([(r, comps)], dataclasses.replace(SETTINGS, dedupe=False), "r1_zero")
    assert [e["id"] for e in kept] == ["mathset:1#0", "mathset:1#1", "mathset:1#2", "mathset:1#3"]
    assert report["total"]["rejected"]["duplicate"] == 0

    kept, report = select([(r, comps)], dataclasses.replace(SETTINGS, max_kept_per_prompt=2), "r1_zero")
    assert [e["id"] for e in kept] == ["mathset:1#0", "mathset:1#1"]
    assert report["total"]["rejected"]["cap"] == 1 and report["total"]["rejected"]["duplicate"] == 1

    none_right = [f" <think> {GOOD} </think> <answer> {wrong(r['answer'])} </answer>"] * 3
    kept, report = select([(r, comps), (records()[1], none_right)], SETTINGS, "r1_zero")
    assert report["total"]["prompts"] == 2 and report["total"]["prompts_with_kept"] == 1


def test_select_with_a_reward_fn_scores_only_well_formed_completions_in_one_call():
    recs = records()
    samples = list(zip(recs, stub_policy(recs, len(CASES)), strict=True))
    calls = []

    def reward_fn(completions, recs_):
        calls.append(len(completions))
        return {"accuracy": np.asarray([rejection.accuracy_of(c, r, "r1_zero") for c, r in zip(completions, recs_)])}

    kept, report = select(samples, SETTINGS, "r1_zero", reward_fn=reward_fn)
    assert calls == [len(recs) * (len(CASES) - expected_reasons()["format"])]
    assert (kept, report) == select(samples, SETTINGS, "r1_zero")


def test_select_with_reward_worker_processes_matches_inline():
    from r1jax.rewards import RewardFn

    recs = records()[:2]
    samples = list(zip(recs, stub_policy(recs, len(CASES)), strict=True))
    with RewardFn({"accuracy": 1.0}, workers=1, timeout=60.0) as fn:
        assert select(samples, SETTINGS, "r1_zero", reward_fn=fn) == select(samples, SETTINGS, "r1_zero")


@pytest.mark.parametrize("bad, needle", [
    ({"id": "x:1", "question": "q"}, "no 'answer'"),
    ({"question": "q", "answer": "1"}, "no 'id'"),
    ({"id": "x:1", "answer": "1"}, "no 'question'"),
])
def test_malformed_record_is_a_clear_error(bad, needle):
    with pytest.raises(DataError, match=f"record 1.*{needle}"):
        select([(records()[0], ["x"]), (bad, ["y"])], SETTINGS, "r1_zero")
    with pytest.raises(DataError, match="appears twice"):
        select([(records()[0], ["x"]), (records()[0], ["y"])], SETTINGS, "r1_zero")


# --------------------------------------------------------------------------------------------------
# mix
# --------------------------------------------------------------------------------------------------

def _examples(prefix, n, **extra):
    return [{"id": f"{prefix}:{i}", "question": f"q{i}", "answer": f"a{i}", **extra} for i in range(n)]


def test_mix_share_is_exact_and_deterministic():
    reasoning = _examples("r", 30, reasoning="because", source="math")
    non = _examples("n", 25)
    out = mix(reasoning, non, 0.25, seed=3)
    assert len(out) == 40
    picked = [e for e in out if e["source"] == "non_reasoning"]
    assert len(picked) == 10 and all(e["reasoning"] == "" for e in picked)
    assert len({e["id"] for e in picked}) == 10 and {e["id"] for e in picked} <= {e["id"] for e in non}
    assert sorted(e["id"] for e in out if e["source"] == "math") == sorted(e["id"] for e in reasoning)
    assert mix(reasoning, non, 0.25, seed=3) == out
    assert mix(reasoning, non, 0.25, seed=4) != out
    assert [e["id"] for e in out] != [e["id"] for e in reasoning + picked]  # shuffled together
    assert sorted(e["id"] for e in mix(reasoning, non, 0.0, seed=0)) == sorted(e["id"] for e in reasoning)


def test_mix_refuses_more_than_supplied_and_bad_examples():
    reasoning = _examples("r", 30, reasoning="because")
    with pytest.raises(ValueError, match="needs 30 non-reasoning examples, but 25 were supplied.*0.4545"):
        mix(reasoning, _examples("n", 25), 0.5, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        mix(reasoning, _examples("n", 25), 1.0, seed=0)
    with pytest.raises(DataError, match="'answer'"):
        mix(reasoning, [{"id": "n:0", "question": "q"}] * 10, 0.25, seed=0)
    anon = mix(reasoning[:3], [{"question": "q", "answer": "a"}], 0.25, seed=0)
    assert [e["id"] for e in anon if e.get("source") == "non_reasoning"] == ["non_reasoning:0"]


# --------------------------------------------------------------------------------------------------
# write_dataset and the SFT stage's sources
# --------------------------------------------------------------------------------------------------

@functools.cache
def tokenizer():
    from r1jax.data.pipeline import tokenizer_corpus
    from r1jax.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as d:
        tok = Tokenizer.train_sentencepiece(tokenizer_corpus(ArithmeticTask(0, "train", 300), "r1_zero", 300), d, 340)
    return Tokenizer.from_files(tok.files())


def _kept_examples():
    recs = records()
    kept, report = select(list(zip(recs, stub_policy(recs, len(CASES)), strict=True)), SETTINGS, "r1_zero")
    return mix(kept, _examples("chat", 10), 0.25, seed=0), report


def test_written_dataset_reads_back_through_jsonl_and_tfds(tmp_path):
    import tensorflow_datasets as tfds

    from r1jax.data import tfds_builders

    examples, report = _kept_examples()
    # extras of every JSON kind, and text outside ASCII, must come back from tfds as they went in
    examples.append({"id": "extra:0", "question": "Combien font 2 + 2 ?", "reasoning": "deux et deux — quatre",
                     "answer": "4", "meta": {"n": 3, "tags": ["é", None, True]}, "score": 0.5})
    assert {type(v) for ex in examples for k, v in ex.items() if k not in tfds_builders.TEXT_FIELDS} > {str}
    paths = write_dataset(examples, tmp_path / "out", report=report)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging left behind
    assert json.loads(Path(paths["report"]).read_text())["total"] == report["total"]

    via_jsonl = make_source(DataConfig(source="jsonl", path=paths["jsonl"]), "train")
    jsonl_records = [via_jsonl[i] for i in range(len(via_jsonl))]
    assert jsonl_records == examples

    encode = EncodeSFT(tokenizer(), "r1_zero", 512)
    for ex in examples:
        row = encode.map(via_jsonl[examples.index(ex)])
        assert row["loss_mask"].any() and not row["loss_mask"].all()
        completion = tokenizer().decode(row["inputs"][row["loss_mask"]].tolist(), skip_special=True)
        assert f"<think> {ex['reasoning']} </think> <answer> {ex['answer']} </answer>" in completion

    # The SFT stage's tfds source: the full records of train.jsonl, in its order.
    assert paths["tfds_data_dir"] == str(tmp_path / "out" / "tfds")
    src = make_source(DataConfig(source="tfds", name="samples", path=paths["tfds_data_dir"]), "train")
    assert isinstance(src, tfds_builders.TfdsSource)
    assert [src[i] for i in range(len(src))] == jsonl_records
    assert pickle.loads(pickle.dumps(src))[len(src) - 1] == jsonl_records[-1]
    # plain tfds reads it too, under the name and split the report gives
    dataset = json.loads(Path(paths["report"]).read_text())["dataset"]
    assert (dataset["tfds_name"], dataset["tfds_split"]) == (paths["tfds_name"], "train")
    assert tfds_builders.R1jaxSamples.SPLITS == (dataset["tfds_split"],)
    ds = tfds.data_source(dataset["tfds_name"], split=dataset["tfds_split"], data_dir=paths["tfds_data_dir"])
    assert [tfds_builders.R1jaxSamples.to_record(ds[i]) for i in range(len(ds))] == examples
    assert "tensorflow" not in sys.modules

    with pytest.raises(DataError, match="no split 'test'"):
        make_source(DataConfig(source="tfds", name="samples", path=paths["tfds_data_dir"]), "test")
    with pytest.raises(DataError, match="not prepared from shipped files.*rejection"):
        tfds_builders.prepare("samples", tmp_path / "elsewhere")


def test_empty_dataset_has_no_tfds_and_says_so(tmp_path):
    paths = write_dataset([], tmp_path / "out", report={})
    assert sorted(os.listdir(tmp_path / "out")) == ["report.json", "train.jsonl"]
    assert paths["tfds_name"] is None
    assert json.loads(Path(paths["report"]).read_text())["dataset"]["tfds_name"] is None
    with pytest.raises(DataError, match=f"{paths['tfds_data_dir']}: no prepared r1jax_samples.*only train.jsonl"):
        make_source(DataConfig(source="tfds", name="samples", path=paths["tfds_data_dir"]), "train")


def test_write_refuses_to_overwrite_and_loses_nothing_on_error(tmp_path):
    examples, _ = _kept_examples()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match=f"{out}.*refusing to overwrite"):
        write_dataset(examples, out)
    assert os.listdir(out) == ["keep.txt"]

    def explode(*args):
        raise OSError("disk full")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rejection, "_write_tfds", explode)
        with pytest.raises(OSError, match="disk full"):
            write_dataset(examples, out, overwrite=True)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["out"]

    with pytest.raises(DataError, match="'answer' must be a string"):
        write_dataset([{**examples[0], "answer": None}], out, overwrite=True)
    assert os.listdir(out) == ["keep.txt"]

    write_dataset(examples[:3], out, overwrite=True)
    assert sorted(os.listdir(out)) == ["report.json", "tfds", "train.jsonl"]
    assert os.listdir(out / "tfds") == ["r1jax_samples"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert len((out / "train.jsonl").read_text().splitlines()) == 3

    (tmp_path / "empty").mkdir()
    write_dataset(examples[:1], tmp_path / "empty")  # an empty directory is not a dataset
    assert len((tmp_path / "empty" / "train.jsonl").read_text().splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# run_rejection
# --------------------------------------------------------------------------------------------------

def test_run_rejection_end_to_end(tmp_path):
    recs = records()
    batches = []

    def policy(batch, k):
        batches.append([r["id"] for r in batch])
        return stub_policy(batch, k)

    lines = []
    report = run_rejection(policy, recs, SETTINGS, "r1_zero", tmp_path / "sft", _examples("chat", 10), log=lines.append)
    assert batches == [[r["id"] for r in recs[i:i + 2]] for i in range(0, 5, 2)]
    assert len(lines) == 3
    n_kept = len(recs) * KEPT_PER_PROMPT
    assert report["total"]["accepted"] == n_kept
    assert report["mix"] == {"reasoning": n_kept, "non_reasoning": round(0.25 * n_kept / 0.75)}
    assert report == json.loads((tmp_path / "sft" / "report.json").read_text())
    _, per_batch_report = select(list(zip(recs, stub_policy(recs, len(CASES)), strict=True)), SETTINGS, "r1_zero")
    assert report["sources"] == per_batch_report["sources"]
    written = [json.loads(line) for line in (tmp_path / "sft" / "train.jsonl").read_text().splitlines()]
    assert len(written) == report["dataset"]["examples"] == n_kept + report["mix"]["non_reasoning"]

    with pytest.raises(DataError, match="refusing to overwrite"):
        run_rejection(policy, recs, SETTINGS, "r1_zero", tmp_path / "sft")
    assert len(batches) == 3  # refused before sampling


def test_run_rejection_records_how_it_sampled(tmp_path):
    drawn = {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "max_new_tokens": 80}
    report = run_rejection(stub_policy, records(), SETTINGS, "r1_zero", tmp_path / "a", sampling=drawn)
    assert report["sampling"] == drawn
    assert json.loads((tmp_path / "a" / "report.json").read_text())["sampling"] == drawn
    assert run_rejection(stub_policy, records(), SETTINGS, "r1_zero", tmp_path / "b")["sampling"] is None


def test_run_rejection_checks_records_before_sampling_and_checks_the_policy(tmp_path):
    def never(batch, k):
        raise AssertionError("sampled before the records were checked")

    bad = [*records(), {"id": "x:9", "question": "q"}]
    with pytest.raises(DataError, match="record 5 \\(id 'x:9'\\): no 'answer'"):
        run_rejection(never, bad, SETTINGS, "r1_zero", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    with pytest.raises(ValueError, match="3 completions for record 'mathset:1', expected 12"):
        run_rejection(lambda batch, k: [["a"] * 3 for _ in batch], records(), SETTINGS, "r1_zero", tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_run_rejection_reports_what_the_reward_workers_met(tmp_path):
    """Scoring through the GRPO reward workers: an exploding answer is refused (not verified), an
    over-long completion is not scored; both read "incorrect", and the report counts them."""
    from r1jax.rewards import RewardFn

    tower = f" <think> {GOOD} </think> <answer> 10^{{10^{{10^{{10}}}}}} </answer>"
    settings = dataclasses.replace(SETTINGS, samples_per_prompt=3, non_reasoning_ratio=0.0)

    def policy(batch, k):
        return [[f" <think> {GOOD} </think> <answer> {r['answer']} </answer>", tower,
                 f" <think> {GOOD} </think> <answer> {r['answer']} </answer>" + " " * 2000] for r in batch]

    recs = records()[:2]
    with RewardFn({"accuracy": 1.0}, workers=1, timeout=30.0, max_chars=1000) as fn:
        report = run_rejection(policy, recs, settings, "r1_zero", tmp_path / "sft", reward_fn=fn)
    assert report["total"]["accepted"] == 2 and report["total"]["rejected"]["incorrect"] == 4
    scoring = report["scoring"]
    assert (scoring["completions"], scoring["refusals"], scoring["oversized"]) == (6, 2, 2)
    assert scoring["timeouts"] == scoring["crashes"] == 0 and 0 < scoring["worker_peak_rss_mb"] < 2048
    assert json.loads((tmp_path / "sft" / "report.json").read_text())["scoring"] == scoring
    assert run_rejection(policy, recs, settings, "r1_zero", tmp_path / "inline")["scoring"] is None  # no reward_fn
