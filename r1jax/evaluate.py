"""Evaluation by sampling, as the DeepSeek-R1 paper reports it (arXiv 2501.12948, section 3.1).

- `greedy_accuracy`: greedy decoding scored by the accuracy reward, the quick held-out check the
  training stages run (`heldout_eval_fn`);
- `sample_eval`: k samples per problem (R1: temperature 0.6, top-p 0.95), scored and summarised by
  `r1jax.metrics` (pass@1, pass@j, cons@k);
- `write_results`: a per-problem JSONL and a summary JSON beside it.

Samples are scored as GRPO scores them: the accuracy reward in `rewards.RewardFn` worker processes
(`eval_scorer`: per-completion timeout, capped address space, over-long completions scoring 0), never
in this process unless a caller passes its own `check(record, completion)` (e.g. `rewards.check_answer`,
which runs here with no timeout).

These are host loops around the compiled sampler; they know no stage (the eval stage is
`r1jax.stages.eval`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from r1jax.checkpoint import write_atomic
from r1jax.metrics import answer_equivalence, summarize
from r1jax.progress import Progress
from r1jax.rewards import RewardFn, extract_answer
from r1jax.rewards.combine import (
    MAX_COMPLETION_CHARS,
    MEMORY_MB,
    STAT_MAXIMA,
    stats_delta,
)
from r1jax.sampling import generate, pad_prompts
from r1jax.tokenizer import Tokenizer, encode_prompt

Check = Callable[[dict, str], bool]  # check(record, completion): is the completion right
Scorer = Callable[[list[str], list[dict]], dict]  # scorer(completions, records)["accuracy"]: float[N], RewardFn's


def eval_scorer(template: str, *, timeout: float = 10.0, workers: int = 0, memory_mb: int = MEMORY_MB,
                max_chars: int = MAX_COMPLETION_CHARS) -> RewardFn:
    """The scorer evaluation uses by default: the accuracy reward alone in RewardFn worker processes
    (timeout per completion, memory_mb address space per worker, completions over max_chars scoring 0).
    A sample is right when its accuracy is > 0.5 (`rewards.check_answer`'s verdict). Close it after use."""
    return RewardFn({"accuracy": 1.0}, timeout=timeout, workers=workers, template=template, memory_mb=memory_mb,
                    max_chars=max_chars)


def _verdicts(records: list[dict], texts: list[str], check: Check | None, scorer: Scorer) -> list[bool]:
    if check is not None:
        return [bool(check(rec, text)) for rec, text in zip(records, texts, strict=True)]
    return [bool(a > 0.5) for a in scorer(texts, records)["accuracy"]]


def _stats(scorer) -> dict | None:
    stats = getattr(scorer, "stats", None)
    return dict(stats()) if callable(stats) else None


def _stats_since(scorer, before: dict | None) -> dict | None:
    now = _stats(scorer)
    return now if now is None or before is None else stats_delta(before, now)


def _to_host(x: jax.Array):
    """A (possibly multi-process) array as numpy on every host."""
    if x.is_fully_addressable:
        return jax.device_get(x)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


def greedy_accuracy(graphdef: nnx.GraphDef, state: nnx.State, tokenizer: Tokenizer, template: str,
                    records: list[dict], max_new_tokens: int, batch_size: int = 128, check: Check | None = None,
                    progress: str = "", scorer: Scorer | None = None) -> dict:
    """Greedy-decode each record's prompt; score each batch with `scorer` (default: an `eval_scorer`
    of its own, closed at the end), or, when given, `check(record, completion)` in this process.
    Returns accuracy, count, a few samples and "scoring" (the scorer's `stats` over this call: timeouts,
    refusals, restarts, ...; None for a check or a scorer without stats); when the records mix
    scenarios (data.general_share), also "by_scenario": {scenario: the share scored correct among
    that scenario's records} (general: the hidden preference met). `progress`: a label to show a
    progress bar under (default: none)."""
    own = check is None and scorer is None
    scorer = eval_scorer(template) if own else scorer
    try:
        return _greedy_accuracy(graphdef, state, tokenizer, template, records, max_new_tokens, batch_size, check,
                                progress, scorer)
    finally:
        if own:
            scorer.close()


def _greedy_accuracy(graphdef, state, tokenizer, template, records, max_new_tokens, batch_size, check, progress,
                     scorer) -> dict:
    before = _stats(scorer) if check is None else None
    prompts = [encode_prompt(tokenizer, template, r["question"]) for r in records]
    total = max(len(p) for p in prompts) + max_new_tokens
    correct, samples = 0, []
    hits: dict[str, list[int]] = {}  # scenario -> [correct, count]
    bar = Progress(len(records), progress, "problem", active=None if progress else False)
    for start in range(0, len(records), batch_size):
        chunk = prompts[start:start + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n)  # fixed shapes: one compilation
        toks, lens = pad_prompts(chunk, total, tokenizer.pad_id)
        res = generate(graphdef, state, toks, lens, jax.random.key(0), max_new_tokens=max_new_tokens,
                       eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size)
        out, new_lens = _to_host(res["tokens"]), _to_host(res["lengths"])
        recs = records[start:start + n]
        texts = [tokenizer.decode(out[i, lens[i]:new_lens[i]].tolist(), skip_special=True) for i in range(n)]
        for rec, text, ok in zip(recs, texts, _verdicts(recs, texts, check, scorer), strict=True):
            correct += ok
            tally = hits.setdefault(rec.get("scenario", "reasoning"), [0, 0])
            tally[0], tally[1] = tally[0] + ok, tally[1] + 1
            if len(samples) < 3:
                samples.append({"question": rec["question"], "completion": text, "answer": rec["answer"], "correct": ok})
        bar.update(n, {"accuracy": f"{correct / (start + n):.3f}"})
    bar.close()
    out = {"accuracy": correct / max(len(records), 1), "n": len(records), "samples": samples,
           "scoring": _stats_since(scorer, before) if check is None else None}
    if len(hits) > 1:
        out["by_scenario"] = {k: c / n for k, (c, n) in sorted(hits.items())}
    return out


def _clip(text: str, limit: int) -> str:
    """`text`, or its first and last limit/2 characters around a marker (the answer sits at the end)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}[... {len(text) - 2 * half} characters ...]{text[len(text) - half:]}"


def sample_completions(graphdef: nnx.GraphDef, state: nnx.State, tokenizer: Tokenizer, template: str,
                       records: list[dict], *, k: int, max_new_tokens: int, temperature: float = 0.6,
                       top_p: float = 0.95, top_k: int = 0, seed: int = 0,
                       batch_size: int = 128, progress: str = "") -> tuple[list[list[str]], dict]:
    """k sampled completions of each record's prompt (texts[i][j]: record i, sample j), and stats
    {"batch_size", "tokens_per_s", "mean_new_tokens"}. The k x len(records) rows run in batches of
    at most min(batch_size, rows) rows, the last padded, so `generate` compiles once. Each prompt is
    prefilled once per batch for G of its samples (`generate(samples_per_prompt=G)`), G the largest
    divisor of k that fits a batch; a batch holds batch_size // G prompts. Batch c draws with
    fold_in(key(seed), c): the samples depend on seed and batch_size. `progress`: a label to show
    a progress bar under (default: none)."""
    if not records:
        raise ValueError("sample_completions: no records")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"sample_completions: k={k!r}; need an integer >= 1 samples per problem")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"sample_completions: batch_size={batch_size!r}; need an integer >= 1 rows per batch")
    prompts = [encode_prompt(tokenizer, template, r["question"]) for r in records]
    total = max(len(p) for p in prompts) + max_new_tokens
    cap = min(batch_size, k * len(records))  # rows per generate call at most
    g = max(d for d in range(1, k + 1) if k % d == 0 and d <= cap)  # samples per prefilled prompt
    units = np.repeat(np.arange(len(records)), k // g)  # prefilled prompt -> its record
    per_call = cap // g  # prompts per generate call
    batch = per_call * g
    key = jax.random.key(seed)
    texts: list[list[str]] = [[] for _ in records]
    new_tokens, start_time = 0, time.perf_counter()
    bar = Progress(k * len(records), progress, "sample", active=None if progress else False)
    for c, start in enumerate(range(0, len(units), per_call)):
        chunk_units = units[start:start + per_call]
        chunk = [prompts[i] for i in chunk_units]
        chunk += [chunk[-1]] * (per_call - len(chunk_units))  # fixed shapes: one compilation
        toks, lens = pad_prompts(chunk, total, tokenizer.pad_id)
        res = generate(graphdef, state, toks, lens, jax.random.fold_in(key, c), max_new_tokens=max_new_tokens,
                       eos_id=tokenizer.eos_id, temperature=temperature, top_k=top_k, top_p=top_p,
                       vocab_limit=tokenizer.vocab_size, samples_per_prompt=g)
        out, new_lens = _to_host(res["tokens"]), _to_host(res["lengths"])
        rows, lens = np.repeat(chunk_units, g), np.repeat(lens, g)  # row j: sample j % g of prompt j // g
        for j, rec in enumerate(rows):
            texts[rec].append(tokenizer.decode(out[j, lens[j]:new_lens[j]].tolist(), skip_special=True))
            new_tokens += int(new_lens[j] - lens[j])
        bar.update(len(rows), {"tok/s": f"{new_tokens / max(time.perf_counter() - start_time, 1e-9):,.0f}"})
    bar.close()
    seconds = time.perf_counter() - start_time
    return texts, {"batch_size": batch, "tokens_per_s": new_tokens / max(seconds, 1e-9),
                   "mean_new_tokens": new_tokens / (k * len(records))}


def sample_eval(graphdef: nnx.GraphDef, state: nnx.State, tokenizer: Tokenizer, template: str,
                records: list[dict], *, k: int, max_new_tokens: int, temperature: float = 0.6,
                top_p: float = 0.95, top_k: int = 0, seed: int = 0, batch_size: int = 128,
                ks: Sequence[int] | None = None, check: Check | None = None,
                answer_of: Callable[[str], str | None] | None = None, keep_completions: int = 4,
                max_chars: int = 2000, progress: str = "", scorer: Scorer | None = None) -> dict:
    """Sample k completions of each record's prompt and score them as the R1 paper does (section 3.1:
    pass@1 over k samples at temperature 0.6, top-p 0.95; cons@k by majority vote).

    scorer(completions, records)["accuracy"]: scores all samples at once, right when > 0.5 (default: an
    `eval_scorer` of its own, closed at the end: the GRPO accuracy reward in timed, memory-capped worker
    processes); check(record, completion) -> bool, when given, decides instead, in this process.
    answer_of(completion) -> str | None: the answer it votes for (default:
    `rewards.extract_answer`), grouped by `metrics.answer_equivalence(record)`. ks: the pass@j to
    report (default: 1 and k). The k x len(records) rows run in batches of at most min(batch_size,
    rows), the last padded, so `generate` compiles once, each prompt prefilled once for the samples
    it has in a batch (`sample_completions`); batch c draws with fold_in(key(seed), c): the samples
    depend on seed and batch_size.

    Returns `summarize`'s dict ("pass@1", "pass@<j>", "cons@<k>", "answered", "n" problems, "k"),
    "sampling" (the settings), "tokens_per_s", "mean_new_tokens", "scoring" (the scorer's `stats`
    over this call, None with a check), and "problems": per record its
    "id", "question", "answer", "n_correct", "k", "majority", "majority_votes", "majority_correct" and
    "samples": k x {"answer", "correct"}, the first `keep_completions` also with the "completion"
    (clipped to max_chars).
    """
    if not records:
        raise ValueError("sample_eval: no records")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"sample_eval: k={k!r}; need an integer >= 1 samples per problem")
    answer_of = answer_of or extract_answer
    texts, stats = sample_completions(graphdef, state, tokenizer, template, records, k=k,
                                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      top_k=top_k, seed=seed, batch_size=batch_size, progress=progress)
    flat_records = [rec for rec, ts in zip(records, texts) for _ in ts]
    flat_texts = [t for ts in texts for t in ts]
    own = check is None and scorer is None
    scorer = eval_scorer(template) if own else scorer
    try:
        before = _stats(scorer) if check is None else None
        verdicts = iter(_verdicts(flat_records, flat_texts, check, scorer))
        scoring = _stats_since(scorer, before) if check is None else None
    finally:
        if own:
            scorer.close()
    samples = [[(answer_of(t), next(verdicts)) for t in ts] for ts in texts]
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
    result["scoring"] = scoring
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
                    max_new_tokens: int, check: Check | None = None,
                    scorer: Scorer | None = None) -> Callable[[object], dict] | None:
    """The stage loop's eval_fn: greedy accuracy (`greedy_accuracy`) of a train state (params +
    router_bias) on `records`, on `mesh`; None when there are no records. Scored by `scorer` (the
    caller closes it), else by `check` in this process, else by an `eval_scorer` this eval_fn starts on
    its first call and keeps (`eval_fn.close()` stops its workers; they also stop with this process).
    The result: accuracy, n, samples, with mixed scenarios accuracy_reasoning and accuracy_general
    (the hidden preference met), and the scoring counts as ints (scoring_timeouts, scoring_refusals,
    scoring_restarts, ...)."""
    if not records:
        return None
    owned: list[RewardFn] = []

    def current_scorer() -> Scorer | None:
        if scorer is not None or check is not None:
            return scorer
        if not owned:
            owned.append(eval_scorer(template))
        return owned[0]

    def eval_fn(state) -> dict:
        model_state = nnx.merge_state(state.params, state.router_bias)
        with jax.set_mesh(mesh):
            out = greedy_accuracy(graphdef, model_state, tokenizer, template, records, max_new_tokens, check=check,
                                  scorer=current_scorer())
        counts = {f"scoring_{k}": int(v) for k, v in (out["scoring"] or {}).items() if k not in STAT_MAXIMA}
        scenarios = {f"accuracy_{k}": float(v) for k, v in out.get("by_scenario", {}).items()}
        return {"accuracy": float(out["accuracy"]), "n": out["n"], "samples": out["samples"], **scenarios, **counts}

    def close() -> None:
        while owned:
            owned.pop().close()

    eval_fn.close = close
    return eval_fn
