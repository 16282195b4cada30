"""Evaluation as the DeepSeek-R1 paper reports it (arXiv 2501.12948, section 3.1 "Evaluation Setup").

- `greedy_accuracy`: greedy exact match, the quick held-out check the training stages run.
- `sample_eval`: k samples per problem at temperature 0.6, top-p 0.95; pass@1 is the fraction of
  correct samples averaged over problems, pass@j the unbiased estimate of Chen et al. 2021, cons@k
  the majority vote over the k sampled answers.

The metrics are pure functions (`pass_at_k`, `majority_answer`, `cons_at_k`, `summarize`), apart
from the sampling driver; `write_results` writes a per-problem JSONL and a summary JSON beside it.
"""

from __future__ import annotations

import json
import math
import operator
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from r1jax.checkpoint import write_atomic
from r1jax.data.procedural import check_arithmetic
from r1jax.rewards import accuracy
from r1jax.sampling import generate, pad_prompts
from r1jax.tokenizer import Tokenizer, encode_prompt

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

Equivalence = Callable[[str, str], bool]
Sample = tuple[str | None, bool]  # (the sample's extracted answer or None, is the sample correct)


def extract_answer(completion: str) -> str | None:
    """The text inside the last <answer>...</answer>, stripped; None if there is none."""
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


def exact_match(expected: str, completion: str) -> bool:
    got = extract_answer(completion)
    return got is not None and got == expected.strip()


# --------------------------------------------------------------------------------------------------
# Metrics (pure)
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Sampling drivers
# --------------------------------------------------------------------------------------------------

def _to_host(x: jax.Array):
    """A (possibly multi-process) array as numpy on every host."""
    if x.is_fully_addressable:
        return jax.device_get(x)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


def greedy_accuracy(graphdef: nnx.GraphDef, state: nnx.State, tokenizer: Tokenizer, template: str,
                    records: list[dict], max_new_tokens: int, batch_size: int = 128,
                    check: Callable[[dict, str], bool] | None = None) -> dict:
    """Greedy-decode each record's prompt; score with `check(record, completion)` (default: exact
    match of the <answer> against record["answer"]). Returns accuracy, count and a few samples."""
    check = check or (lambda rec, text: exact_match(rec["answer"], text))
    prompts = [encode_prompt(tokenizer, template, r["question"]) for r in records]
    total = max(len(p) for p in prompts) + max_new_tokens
    correct, samples = 0, []
    for start in range(0, len(records), batch_size):
        chunk = prompts[start:start + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n)  # fixed shapes: one compilation
        toks, lens = pad_prompts(chunk, total, tokenizer.pad_id)
        res = generate(graphdef, state, toks, lens, jax.random.key(0), max_new_tokens=max_new_tokens,
                       eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size)
        out, new_lens = _to_host(res["tokens"]), _to_host(res["lengths"])
        for i in range(n):
            rec = records[start + i]
            text = tokenizer.decode(out[i, lens[i]:new_lens[i]].tolist(), skip_special=True)
            ok = bool(check(rec, text))
            correct += ok
            if len(samples) < 3:
                samples.append({"question": rec["question"], "completion": text, "answer": rec["answer"], "correct": ok})
    return {"accuracy": correct / max(len(records), 1), "n": len(records), "samples": samples}


def _default_check(record: dict, completion: str) -> bool:
    return accuracy.accuracy_reward(completion, record) > 0.5


def _clip(text: str, limit: int) -> str:
    """`text`, or its first and last limit/2 characters around a marker (the answer sits at the end)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}[... {len(text) - 2 * half} characters ...]{text[len(text) - half:]}"


def sample_completions(graphdef: nnx.GraphDef, state: nnx.State, tokenizer: Tokenizer, template: str,
                       records: list[dict], *, k: int, max_new_tokens: int, temperature: float = 0.6,
                       top_p: float = 0.95, top_k: int = 0, seed: int = 0,
                       batch_size: int = 128) -> tuple[list[list[str]], dict]:
    """k sampled completions of each record's prompt (texts[i][j]: record i, sample j), and stats
    {"batch_size", "tokens_per_s", "mean_new_tokens"}. The k x len(records) rows run in batches of
    min(batch_size, rows), the last padded, so `generate` compiles once; batch c draws with
    fold_in(key(seed), c): the samples depend on seed and batch_size."""
    if not records:
        raise ValueError("sample_completions: no records")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"sample_completions: k={k!r}; need an integer >= 1 samples per problem")
    prompts = [encode_prompt(tokenizer, template, r["question"]) for r in records]
    total = max(len(p) for p in prompts) + max_new_tokens
    owner = np.repeat(np.arange(len(records)), k)  # row -> its record
    batch = min(batch_size, len(owner))
    key = jax.random.key(seed)
    texts: list[list[str]] = [[] for _ in records]
    new_tokens, start_time = 0, time.perf_counter()
    for c, start in enumerate(range(0, len(owner), batch)):
        rows = owner[start:start + batch]
        chunk = [prompts[i] for i in rows]
        chunk += [chunk[-1]] * (batch - len(rows))  # fixed shapes: one compilation
        toks, lens = pad_prompts(chunk, total, tokenizer.pad_id)
        res = generate(graphdef, state, toks, lens, jax.random.fold_in(key, c), max_new_tokens=max_new_tokens,
                       eos_id=tokenizer.eos_id, temperature=temperature, top_k=top_k, top_p=top_p,
                       vocab_limit=tokenizer.vocab_size)
        out, new_lens = _to_host(res["tokens"]), _to_host(res["lengths"])
        for j, rec in enumerate(rows):
            texts[rec].append(tokenizer.decode(out[j, lens[j]:new_lens[j]].tolist(), skip_special=True))
            new_tokens += int(new_lens[j] - lens[j])
    seconds = time.perf_counter() - start_time
    return texts, {"batch_size": batch, "tokens_per_s": new_tokens / max(seconds, 1e-9),
                   "mean_new_tokens": new_tokens / len(owner)}


def sample_eval(graphdef: nnx.GraphDef, state: nnx.State, tokenizer: Tokenizer, template: str,
                records: list[dict], *, k: int, max_new_tokens: int, temperature: float = 0.6,
                top_p: float = 0.95, top_k: int = 0, seed: int = 0, batch_size: int = 128,
                ks: Sequence[int] | None = None, check: Callable[[dict, str], bool] | None = None,
                answer_of: Callable[[str], str | None] | None = None, keep_completions: int = 4,
                max_chars: int = 2000) -> dict:
    """Sample k completions of each record's prompt and score them as the R1 paper does (section 3.1:
    pass@1 over k samples at temperature 0.6, top-p 0.95; cons@k by majority vote).

    check(record, completion) -> bool: is a sample right (default: `accuracy_reward`, the GRPO
    verdict). answer_of(completion) -> str | None: the answer it votes for (default:
    `rewards.accuracy.extract_answer`), grouped by `answer_equivalence(record)`. ks: the pass@j to
    report (default: 1 and k). The k x len(records) rows run in batches of min(batch_size, rows), the
    last padded, so `generate` compiles once; batch c draws with fold_in(key(seed), c): the samples
    depend on seed and batch_size.

    Returns `summarize`'s dict ("pass@1", "pass@<j>", "cons@<k>", "answered", "n" problems, "k"),
    "sampling" (the settings), "tokens_per_s", "mean_new_tokens", and "problems": per record its
    "id", "question", "answer", "n_correct", "k", "majority", "majority_votes", "majority_correct" and
    "samples": k x {"answer", "correct"}, the first `keep_completions` also with the "completion"
    (clipped to max_chars).
    """
    if not records:
        raise ValueError("sample_eval: no records")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"sample_eval: k={k!r}; need an integer >= 1 samples per problem")
    check = check or _default_check
    answer_of = answer_of or accuracy.extract_answer
    texts, stats = sample_completions(graphdef, state, tokenizer, template, records, k=k,
                                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      top_k=top_k, seed=seed, batch_size=batch_size)
    samples = [[(answer_of(t), bool(check(rec, t))) for t in ts] for rec, ts in zip(records, texts)]
    result = summarize(samples, ks=(1, k) if ks is None else ks,
                       equivalent=[answer_equivalence(r) for r in records])
    for row, rec, ts, ss in zip(result["problems"], records, texts, samples):
        kept = [{"answer": a, "correct": ok} for a, ok in ss]
        for s, t in zip(kept[:keep_completions], ts):
            s["completion"] = _clip(t, max_chars)
        row.update(id=rec.get("id"), question=rec["question"], answer=rec.get("answer"), samples=kept)
    result["sampling"] = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed,
                          "max_new_tokens": max_new_tokens, "batch_size": stats["batch_size"]}
    result["tokens_per_s"] = stats["tokens_per_s"]
    result["mean_new_tokens"] = stats["mean_new_tokens"]
    return result


def summary_path(path: str | Path) -> Path:
    """Where `write_results` puts the summary of the JSONL `path`: results.jsonl -> results.summary.json."""
    path = Path(path)
    return path.with_name(f"{path.stem}.summary.json")


def write_results(path: str | Path, result: dict) -> tuple[Path, Path]:
    """Write `result` (from `sample_eval` or `summarize`): one JSON line per problem to `path`, and
    everything else to `summary_path(path)`. Parent directories are created; each file is written to
    a temporary file and renamed over the old one (a re-run replaces it whole). Call from one process.
    Returns (path, summary path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result["problems"])
    summary = {key: value for key, value in result.items() if key != "problems"}
    write_atomic(path, lines)
    write_atomic(summary_path(path), json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    return path, summary_path(path)


def heldout_eval_fn(graphdef: nnx.GraphDef, mesh, tokenizer: Tokenizer, template: str, records: list[dict],
                    max_new_tokens: int, check: Callable[[dict, str], bool]) -> Callable[[object], dict] | None:
    """The stage loop's eval_fn: greedy accuracy of a train state (params + router_bias) on `records`,
    on `mesh`; None when there are no records."""
    if not records:
        return None

    def eval_fn(state) -> dict:
        model_state = nnx.merge_state(state.params, state.router_bias)
        with jax.set_mesh(mesh):
            out = greedy_accuracy(graphdef, model_state, tokenizer, template, records, max_new_tokens, check=check)
        return {"accuracy": float(out["accuracy"]), "n": out["n"], "samples": out["samples"]}

    return eval_fn


def eval_records(cfg, name: str) -> list[dict]:
    """The problems of eval set `name` for config `cfg`: "heldout" is data.eval_split of the configured
    source (eval.examples, else train.eval_examples, of them); gsm8k / math500 / aime2024 the shipped
    test sets (eval.examples of them, 0: all)."""
    from r1jax.data.pipeline import heldout
    from r1jax.data.sources import EVAL_SETS

    if name == "heldout":
        return heldout(cfg.data, cfg.eval.examples or cfg.train.eval_examples)
    source = EVAL_SETS[name]("test")
    n = min(len(source), cfg.eval.examples) if cfg.eval.examples else len(source)
    return [source[i] for i in range(n)]


def run_eval_stage(cfg) -> dict:
    """`r1jax eval CONFIG`: evaluate the checkpoint checkpoint.init_from on each of eval.sets: greedy
    accuracy, and pass@1 over eval.k samples, pass@k and cons@k. Writes <out>/<set>.jsonl (one line per
    problem), <out>/<set>.summary.json and <out>/summary.json, where <out> is checkpoint.dir (else
    <checkpoint.init_from>/eval). Returns {"how", "sets": {name: scalar results}, "out"}."""
    from r1jax.errors import ConfigError
    from r1jax.train.grpo import eval_checker
    from r1jax.train.stage import load_policy

    if not cfg.checkpoint.init_from:
        raise ConfigError("checkpoint.init_from: eval needs the checkpoint to evaluate")
    out = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.checkpoint.init_from) / "eval"
    e = cfg.eval
    policy = load_policy(cfg.checkpoint.init_from)
    if policy.tokenizer is None:
        raise ConfigError(f"checkpoint.init_from: {cfg.checkpoint.init_from} holds no tokenizer")
    max_new = e.max_new_tokens or cfg.train.eval_max_new_tokens
    check = eval_checker()
    results = {}
    with jax.set_mesh(policy.mesh):
        for name in e.sets:
            records = eval_records(cfg, name)
            res = sample_eval(policy.graphdef, policy.state, policy.tokenizer, cfg.data.template, records, k=e.k,
                              max_new_tokens=max_new, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
                              seed=e.seed, batch_size=e.batch_size, check=check)
            if e.greedy:
                res["greedy"] = greedy_accuracy(policy.graphdef, policy.state, policy.tokenizer, cfg.data.template,
                                                records, max_new, batch_size=e.batch_size, check=check)["accuracy"]
            if jax.process_index() == 0:
                write_results(out / f"{name}.jsonl", res)
            results[name] = {k: v for k, v in res.items() if isinstance(v, (int, float))}
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "summary.json", json.dumps(results, indent=1) + "\n")
    return {"how": "fresh", "sets": results, "out": out}
