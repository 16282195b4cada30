"""Rejection sampling (DeepSeek-R1, arXiv:2501.12948, section 2.3.3): the SFT data of stage 4.

After reasoning RL, the RL checkpoint samples several responses per prompt; only the correct ones are
kept, and chains of thought "with mixed languages, long paragraphs, and code blocks" are filtered out
(R1 keeps ~600k reasoning samples this way, then adds ~200k non-reasoning ones). Here:

  judge      one completion -> (accepted, reason): the first failing check of CHECK_ORDER decides;
  select     prompts with their completions -> SFT examples + a per-source report (adds the per-prompt
             checks: duplicates, cap);
  mix        reasoning + non-reasoning examples at a configured non-reasoning share;
  write_dataset  out_dir/train.jsonl + out_dir/tfds (array_record) + out_dir/report.json, atomically;
  run_rejection  policy_sample_fn -> select -> mix -> write_dataset (the stage driver,
                 r1jax.stages.rejection, plugs the policy's sampler in).

The pieces know nothing of JAX: `policy_sample_fn(records, k)` is whatever sampler the caller plugs in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r1jax.config import RejectionConfig
from r1jax.errors import ConfigError, DataError
from r1jax.progress import Progress
from r1jax.rewards.accuracy import is_code_record
from r1jax.rewards.answer import answer_tag, extract_answer
from r1jax.rewards.code import extract_program
from r1jax.rewards.combine import score_components, stats_delta
from r1jax.rewards.format import format_reward
from r1jax.rewards.language import language_consistency
from r1jax.tokenizer import TEMPLATES

ACCEPTED = "ok"
# judge's checks, in the order they run; the first that fails names the rejection.
CHECK_ORDER = ("format", "no_answer", "incorrect", "language", "length", "code", "paragraph")
# select's per-prompt checks, after judge accepted the completion.
PROMPT_CHECKS = ("duplicate", "cap")
REASONS = CHECK_ORDER + PROMPT_CHECKS

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_THINK = re.compile(r"<think>(.*?)(?:</think>|\Z)", re.DOTALL)
_CODE_FENCE = re.compile(r"```|^[ \t]*~~~", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


# What rejection sampling keeps: the `rejection:` config section (r1jax.config.RejectionConfig).
RejectionSettings = RejectionConfig


def _check(settings: RejectionSettings, template: str) -> None:
    problems = settings.errors()
    if problems:
        key, msg = problems[0]
        raise ConfigError(f"rejection.{key}: {msg}")
    if template not in TEMPLATES:
        raise ConfigError(f"unknown chat template {template!r}; known: {', '.join(TEMPLATES)}")


# --------------------------------------------------------------------------------------------------
# One completion
# --------------------------------------------------------------------------------------------------

def split_completion(completion: str) -> tuple[str, str | None]:
    """(reasoning, answer) of a completion, both stripped; the answer is None if there is none.

    reasoning: the first <think> block (to the end if it never closes); without <think>, the text
    before the last <answer> (or all of it). answer: the last <answer>...</answer> verbatim (a
    `\\boxed{}` inside stays), else the `\\boxed{}` / `#### x` answer of rewards.extract_answer.
    In the "r1" layout the summary between </think> and <answer> is dropped: the SFT template
    (tokenizer.render_completion) writes its own.
    """
    think = _THINK.search(completion)
    tag = answer_tag(completion)
    if think is not None:
        reasoning = think.group(1)
    else:
        reasoning = completion[:tag.start] if tag is not None else completion
    answer = tag.content if tag is not None else extract_answer(completion)
    return reasoning.strip(), None if answer is None else answer.strip()


def _has_answer(completion: str, record: Mapping[str, Any], answer: str | None) -> bool:
    """A non-blank final answer; for a code record also a program in it (rewards.extract_program)."""
    return bool(answer) and (not is_code_record(record) or extract_program(completion) is not None)


def _layout_reason(completion: str, record: Mapping[str, Any], settings: RejectionSettings,
                   template: str) -> str | None:
    """The checks before correctness: "format", then "no_answer"; None if both pass."""
    if settings.require_format and format_reward(completion, template) != 1.0:
        return "format"
    reasoning, answer = split_completion(completion)
    if not _has_answer(completion, record, answer):
        return "no_answer"
    if any(tag in reasoning or tag in answer for tag in TAGS):
        return "format"  # stray tags (possible only without require_format) would nest in the SFT text
    return None


def _readability_reason(completion: str, reasoning: str, settings: RejectionSettings) -> str | None:
    """R1's readability filters on the chain of thought: language, length, code, paragraph."""
    if language_consistency(completion, settings.target_language) < settings.min_language_consistency:
        return "language"
    n = len(reasoning)
    if n < settings.min_reasoning_chars or (settings.max_reasoning_chars and n > settings.max_reasoning_chars):
        return "length"
    if settings.reject_code_blocks and _CODE_FENCE.search(reasoning):
        return "code"
    if settings.max_paragraph_chars and any(len(p.strip()) > settings.max_paragraph_chars
                                            for p in _PARAGRAPH_BREAK.split(reasoning)):
        return "paragraph"
    return None


def accuracy_of(completion: str, record: Mapping[str, Any], template: str, target_language: str = "en") -> float:
    """The accuracy reward exactly as the GRPO RewardFn computes it (code records: sandboxed tests)."""
    return score_components(completion, record, ("accuracy",), target_language, template)["accuracy"]


def judge(completion: str, record: Mapping[str, Any], settings: RejectionSettings, template: str, *,
          accuracy: float | None = None) -> tuple[bool, str]:
    """(accepted, reason) for one completion of `record`; reason is ACCEPTED ("ok") or the first of
    CHECK_ORDER that fails:

      format     require_format and not the template's layout (rewards.format_reward); or a think/answer
                 tag left inside the split reasoning or answer;
      no_answer  no final answer (code records: no program);
      incorrect  accuracy reward < 1 (rewards.accuracy_reward; code records: all tests pass);
      language   target-language share of the CoT words (rewards.language_consistency, which reads the
                 first <think> block, or all text without one) < min_language_consistency;
      length     CoT shorter than min_reasoning_chars or longer than max_reasoning_chars;
      code       a fenced code block in the CoT (reject_code_blocks);
      paragraph  a CoT paragraph longer than max_paragraph_chars.

    `accuracy`: the accuracy reward if already computed (e.g. by a RewardFn with timeouts); else it
    is computed here, in this process, without a timeout.
    """
    _check(settings, template)
    if not isinstance(completion, str):
        raise TypeError(f"completion of record {record.get('id')!r} is a {type(completion).__name__}, not a str")
    reason = _layout_reason(completion, record, settings, template)
    if reason is not None:
        return False, reason
    if accuracy is None:
        accuracy = accuracy_of(completion, record, template, settings.target_language)
    if accuracy < 1.0:
        return False, "incorrect"
    reason = _readability_reason(completion, split_completion(completion)[0], settings)
    return (False, reason) if reason is not None else (True, ACCEPTED)


# --------------------------------------------------------------------------------------------------
# Prompts with their completions
# --------------------------------------------------------------------------------------------------

def source_of(record: Mapping[str, Any]) -> str:
    """A record's source for the report: its "source" field, else its id up to the first ":"
    ("arithmetic:0:train:5" -> "arithmetic", "gsm8k_train.jsonl:12" -> "gsm8k_train.jsonl"), else
    "unknown"."""
    if record.get("source"):
        return str(record["source"])
    rid = str(record.get("id", ""))
    return rid.split(":", 1)[0] if ":" in rid else "unknown"


def validate_records(records: Sequence[Mapping[str, Any]]) -> None:
    """DataError naming the first record that cannot be verified: not a dict, no "id", a repeated id,
    no string "question", or no reference "answer" (a record with "tests" is checked by its tests)."""
    seen: set[str] = set()
    for i in range(len(records)):
        record = records[i]
        where = f"record {i}"
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected a dict, got {type(record).__name__}")
        if "id" not in record:
            raise DataError(f"{where}: no 'id' field")
        where += f" (id {record['id']!r})"
        if str(record["id"]) in seen:
            raise DataError(f"{where}: the id appears twice; ids name the prompts of the dataset")
        seen.add(str(record["id"]))
        if not isinstance(record.get("question"), str):
            raise DataError(f"{where}: no 'question' string")
        if not record.get("tests") and not isinstance(record.get("answer"), (str, int, float)):
            raise DataError(f"{where}: no 'answer' field (the reference that verifies samples; a code "
                            "problem has 'tests' instead)")


def _normalised(reasoning: str, answer: str) -> str:
    return " ".join(reasoning.split()) + "\x00" + " ".join(answer.split())


def sft_example(record: Mapping[str, Any], completion: str, index: int) -> dict[str, Any]:
    """The SFT record of accepted completion `index` of `record`: the record's fields with the sampled
    "reasoning" and "answer" (what tokenizer.render_completion puts in <think> and <answer>), plus
    "id" = "{record id}#{index}", "prompt_id", "source" and "reference_answer" (the record's answer)."""
    reasoning, answer = split_completion(completion)
    # target_answer (a flawed demonstration's stated answer) goes too: the example states the sample's.
    example = {k: v for k, v in record.items() if k not in ("id", "reasoning", "answer", "target_answer")}
    example.update(id=f"{record['id']}#{index}", prompt_id=str(record["id"]), source=source_of(record),
                   question=record["question"], reasoning=reasoning, answer=answer)
    if "answer" in record:
        example["reference_answer"] = str(record["answer"])
    return example


def _new_counts() -> Counter:
    return Counter({key: 0 for key in ("samples", "accepted", "prompts", "prompts_with_kept", *REASONS)})


def _select(samples: Sequence[tuple[Mapping[str, Any], Sequence[str]]], settings: RejectionSettings, template: str,
            reward_fn: Callable | None) -> tuple[list[dict[str, Any]], dict[str, Counter]]:
    """select without the summary: (examples, {source: Counter})."""
    flat = [(p, j, record, c) for p, (record, comps) in enumerate(samples) for j, c in enumerate(comps)]
    for _, _, record, c in flat:
        if not isinstance(c, str):
            raise TypeError(f"a completion of record {record.get('id')!r} is a {type(c).__name__}, not a str")
    accuracy: dict[tuple[int, int], float] = {}
    if reward_fn is not None:  # one batched call, only for what passes the layout checks
        todo = [(p, j, record, c) for p, j, record, c in flat if _layout_reason(c, record, settings, template) is None]
        if todo:
            scores = reward_fn([c for *_, c in todo], [record for _, _, record, _ in todo])["accuracy"]
            accuracy = {(p, j): float(s) for (p, j, _, _), s in zip(todo, scores, strict=True)}
    kept: list[dict[str, Any]] = []
    counts: dict[str, Counter] = {}
    for p, (record, comps) in enumerate(samples):
        tally = counts.setdefault(source_of(record), _new_counts())
        tally["prompts"] += 1
        seen: set[str] = set()
        n_kept = 0
        for j, c in enumerate(comps):
            tally["samples"] += 1
            ok, reason = judge(c, record, settings, template, accuracy=accuracy.get((p, j)) if reward_fn else None)
            if ok and settings.dedupe:
                key = _normalised(*split_completion(c))
                if key in seen:
                    ok, reason = False, "duplicate"
                seen.add(key)
            if ok and settings.max_kept_per_prompt and n_kept >= settings.max_kept_per_prompt:
                ok, reason = False, "cap"
            if ok:
                kept.append(sft_example(record, c, j))
                n_kept += 1
                tally["accepted"] += 1
            else:
                tally[reason] += 1
        tally["prompts_with_kept"] += n_kept > 0
    return kept, counts


def summarize(counts: Mapping[str, Counter]) -> dict[str, Any]:
    """Report from per-source counts: {"total": row, "sources": {source: row}}, each row
    {"samples", "accepted", "acceptance_rate", "prompts", "prompts_with_kept", "rejected": {reason: n}}
    with samples == accepted + sum(rejected.values())."""
    def row(c: Counter) -> dict[str, Any]:
        return {"samples": c["samples"], "accepted": c["accepted"],
                "acceptance_rate": c["accepted"] / c["samples"] if c["samples"] else 0.0,
                "prompts": c["prompts"], "prompts_with_kept": c["prompts_with_kept"],
                "rejected": {reason: c[reason] for reason in REASONS}}

    total = _new_counts()
    for c in counts.values():
        total.update(c)
    return {"total": row(total), "sources": {s: row(counts[s]) for s in sorted(counts)}}


def _merge(into: dict[str, Counter], counts: Mapping[str, Counter]) -> None:
    for source, c in counts.items():
        into.setdefault(source, _new_counts()).update(c)


def select(samples: Sequence[tuple[Mapping[str, Any], Sequence[str]]], settings: RejectionSettings, template: str,
           *, reward_fn: Callable | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Keep the good completions of each prompt; return (SFT examples, report).

    samples: [(record, [completion, ...]), ...], one entry per prompt. Each completion is judged
    (`judge`, reasons CHECK_ORDER); of the accepted ones of a prompt, a (reasoning, answer) equal after
    whitespace normalisation to an earlier kept one is rejected as "duplicate" (settings.dedupe), and
    past max_kept_per_prompt as "cap". Kept examples (`sft_example`) come in prompt, then sampling order.
    reward_fn: optional `fn(completions, records) -> {"accuracy": [n]}`, e.g.
    rewards.RewardFn({"accuracy": 1.0}, timeout=10) to score in worker processes with a timeout (a
    completion whose scoring times out scores 0, so reads "incorrect"); None scores here, no timeout.
    The report is `summarize` of the per-source counts.
    """
    _check(settings, template)
    validate_records([record for record, _ in samples])
    kept, counts = _select(samples, settings, template, reward_fn)
    return kept, summarize(counts)


# --------------------------------------------------------------------------------------------------
# Mixing, writing, the driver
# --------------------------------------------------------------------------------------------------

def mix(reasoning_examples: Sequence[Mapping[str, Any]], non_reasoning_examples: Sequence[Mapping[str, Any]],
        ratio: float, seed: int) -> list[dict[str, Any]]:
    """All reasoning examples plus round(ratio * R / (1 - ratio)) non-reasoning ones (R reasoning
    examples), so that non-reasoning examples make up `ratio` of the result; shuffled together.

    The non-reasoning examples are drawn without replacement (a permutation at `seed`): repeating
    them would silently over-weight a small set, so asking for more than supplied is a ValueError that
    says the largest ratio the data allows. Non-reasoning examples get "reasoning" "" and "source"
    "non_reasoning" and "id" "non_reasoning:{index}" when they have none. Deterministic for a given seed.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"non-reasoning ratio must be in [0, 1), got {ratio}")
    n_r, n_avail = len(reasoning_examples), len(non_reasoning_examples)
    want = round(ratio * n_r / (1.0 - ratio))
    if want > n_avail:
        most = n_avail / (n_r + n_avail) if n_r + n_avail else 0.0
        raise ValueError(f"a non-reasoning ratio of {ratio} with {n_r} reasoning examples needs {want} non-reasoning "
                         f"examples, but {n_avail} were supplied (they are not repeated); the most these allow is "
                         f"{most:.4f}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_avail)
    chosen = [non_reasoning_examples[int(i)] for i in order[:want]]
    extra = []
    for i, ex in zip(order[:want], chosen, strict=True):
        if not isinstance(ex.get("question"), str) or not isinstance(ex.get("answer"), str):
            raise DataError(f"non-reasoning example {int(i)} (id {ex.get('id')!r}): needs 'question' and 'answer' "
                            "strings")
        extra.append({"id": f"non_reasoning:{int(i)}", "reasoning": "", "source": "non_reasoning", **ex})
    out = [dict(ex) for ex in reasoning_examples] + extra
    return [out[int(i)] for i in rng.permutation(len(out))]


TFDS_DIR = "tfds"  # out_dir/TFDS_DIR is the data_dir of the array_record dataset
TFDS_SPLIT = "train"  # = tfds_builders.R1jaxSamples.SPLITS[0]


def _refuse_existing(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"{out_dir}: already holds a dataset (not empty); refusing to overwrite (pass overwrite=True)")


def _check_examples(examples: Sequence[Mapping[str, Any]]) -> None:
    for i, ex in enumerate(examples):
        for key in ("id", "question", "reasoning", "answer"):
            if not isinstance(ex.get(key), str):
                raise DataError(f"example {i} (id {ex.get('id')!r}): {key!r} must be a string")


def _write_jsonl(examples: Sequence[Mapping[str, Any]], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_tfds(examples: Sequence[Mapping[str, Any]], data_dir: Path) -> str:
    from r1jax.data import tfds_builders  # imports tensorflow_datasets: seconds, so only when writing

    return tfds_builders.write_samples(examples, data_dir)


def write_dataset(examples: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *,
                  report: Mapping[str, Any] | None = None, overwrite: bool = False) -> dict[str, str]:
    """Write the SFT dataset; return its paths {"jsonl", "tfds_data_dir", "tfds_name", "report"}.

    out_dir/train.jsonl   one example per line (data.source=jsonl, data.path=that file);
    out_dir/tfds/         array_record tfds dataset "r1jax_samples", split "train", same records in the
                          same order (data.source=tfds, data.name=samples, data.path=that directory;
                          see r1jax.data.tfds_builders.R1jaxSamples);
    out_dir/report.json   `report` plus {"dataset": {"examples", "tfds_name", "tfds_split"}}.
    With no examples there is no tfds dataset (tfds_name None).

    Everything is written to a staging directory next to out_dir and renamed into place at the end, so
    an error leaves out_dir as it was. A non-empty out_dir is a DataError unless overwrite=True.
    """
    out_dir = Path(out_dir).absolute()
    _refuse_existing(out_dir, overwrite)
    _check_examples(examples)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        _write_jsonl(examples, staging / "train.jsonl")
        # tfds cannot hold an empty split; an empty dataset is only train.jsonl (a stage that trains on
        # it stops with "no records", naming the file).
        name = _write_tfds(examples, staging / TFDS_DIR) if examples else None
        full_report = {**(report or {}), "dataset": {"examples": len(examples), "tfds_name": name,
                                                     "tfds_split": TFDS_SPLIT}}
        (staging / "report.json").write_text(json.dumps(full_report, indent=2, ensure_ascii=False) + "\n")
        _refuse_existing(out_dir, overwrite)  # again: something may have appeared meanwhile
        _commit(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"jsonl": str(out_dir / "train.jsonl"), "tfds_data_dir": str(out_dir / TFDS_DIR), "tfds_name": name,
            "report": str(out_dir / "report.json")}


def _commit(staging: Path, out_dir: Path) -> None:
    """Rename staging to out_dir; an existing out_dir is moved aside first and deleted only after."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old / "data")
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(old / "data", out_dir)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _sample_batch(policy_sample_fn: Callable, batch: list[Mapping[str, Any]], k: int) -> list[list[str]]:
    out = policy_sample_fn(batch, k)
    if len(out) != len(batch):
        raise ValueError(f"policy_sample_fn returned {len(out)} lists for {len(batch)} records")
    for record, comps in zip(batch, out, strict=True):
        if len(comps) != k:
            raise ValueError(f"policy_sample_fn returned {len(comps)} completions for record {record['id']!r}, "
                             f"expected {k}")
    return [list(c) for c in out]


def run_rejection(policy_sample_fn: Callable[[list[Mapping[str, Any]], int], Sequence[Sequence[str]]],
                  records: Sequence[Mapping[str, Any]], settings: RejectionSettings, template: str,
                  out_dir: str | os.PathLike, non_reasoning: Sequence[Mapping[str, Any]] | None = None, *,
                  reward_fn: Callable | None = None, overwrite: bool = False,
                  log: Callable[[str], None] | None = None, progress: bool = False,
                  sampling: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Rejection-sampling stage: sample, select, mix, write. Returns the report written to report.json.

    policy_sample_fn(records, k) -> k completions (text after the prompt of `template`) per record,
    called on batches of settings.prompts_per_batch records. records: a sequence (or grain source) of
    {"id", "question", "answer", ...}, all validated before any sampling. non_reasoning: examples
    mixed in at settings.non_reasoning_ratio (`mix`); None or empty keeps only reasoning examples.
    reward_fn: see `select`. log: called with a progress line after each batch. progress: show a
    progress bar (r1jax.progress: plain lines when stderr is no terminal; process 0 only).
    sampling: how policy_sample_fn draws (temperature, top_p, ...), recorded in the report as it is.
    The report: `summarize` of all batches + {"template", "settings", "sampling", "mix": {"reasoning",
    "non_reasoning"}, "seconds", "samples_per_second", "scoring"} (+ "dataset", see write_dataset);
    "scoring" is the reward_fn's `stats` over this run (a RewardFn's: timeouts, refusals, worker
    restarts, over-long completions, peak worker RSS), None without one.
    """
    _check(settings, template)
    out_path = Path(out_dir)
    _refuse_existing(out_path.absolute(), overwrite)  # before hours of sampling, not after
    validate_records(records)
    counts: dict[str, Counter] = {}
    kept: list[dict[str, Any]] = []
    stats = getattr(reward_fn, "stats", None)
    stats_before = stats() if callable(stats) else None
    start, n, step = time.perf_counter(), len(records), settings.prompts_per_batch
    bar = Progress(n, "rejection sampling", "prompt", active=None if progress else False)
    for lo in range(0, n, step):
        batch = [records[i] for i in range(lo, min(lo + step, n))]
        comps = _sample_batch(policy_sample_fn, batch, settings.samples_per_prompt)
        batch_kept, batch_counts = _select(list(zip(batch, comps, strict=True)), settings, template, reward_fn)
        kept += batch_kept
        _merge(counts, batch_counts)
        done = min(lo + step, n)
        rate = done * settings.samples_per_prompt / (time.perf_counter() - start)
        bar.update(len(batch), {"kept": f"{len(kept)}/{done * settings.samples_per_prompt}", "samples/s": f"{rate:.1f}"})
        if log is not None:
            log(f"rejection sampling: {done}/{n} prompts, kept {len(kept)} of {done * settings.samples_per_prompt} "
                f"samples, {rate:.1f} samples/s")
    bar.close()
    seconds = time.perf_counter() - start
    ratio = settings.non_reasoning_ratio if non_reasoning else 0.0
    examples = mix(kept, non_reasoning or [], ratio, settings.seed)
    report = {**summarize(counts), "template": template, "settings": dataclasses.asdict(settings),
              "sampling": dict(sampling) if sampling is not None else None,
              "mix": {"reasoning": len(kept), "non_reasoning": len(examples) - len(kept)},
              "seconds": seconds, "samples_per_second": n * settings.samples_per_prompt / seconds if seconds else 0.0,
              "scoring": stats_delta(stats_before, stats()) if stats_before is not None else None}
    paths = write_dataset(examples, out_path, report=report, overwrite=overwrite)
    return json.loads(Path(paths["report"]).read_text())
