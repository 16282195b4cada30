"""Evaluation by sampling, as the DeepSeek-R1 paper reports it (arXiv 2501.12948, section 3.1).

- `greedy_accuracy`: greedy decoding scored by `rewards.check_answer`, the quick held-out check the
  training stages run (`heldout_eval_fn`);
- `sample_eval`: k samples per problem (R1: temperature 0.6, top-p 0.95), scored and summarised by
  `r1jax.metrics` (pass@1, pass@j, cons@k);
- `write_results`: a per-problem JSONL and a summary JSON beside it.

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
from r1jax.rewards import check_answer, extract_answer
from r1jax.sampling import generate, pad_prompts
from r1jax.tokenizer import Tokenizer, encode_prompt

Check = Callable[[dict, str], bool]  # check(record, completion): is the completion right


def _to_host(x: jax.Array):
    """A (possibly multi-process) array as numpy on every host."""
    if x.is_fully_addressable:
        return jax.device_get(x)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


def greedy_accuracy(graphdef: nnx.GraphDef, state: nnx.State, tokenizer: Tokenizer, template: str,
                    records: list[dict], max_new_tokens: int, batch_size: int = 128, check: Check | None = None,
                    progress: str = "") -> dict:
    """Greedy-decode each record's prompt; score with `check(record, completion)` (default:
    `rewards.check_answer`, the accuracy reward's verdict). Returns accuracy, count and a few
    samples. `progress`: a label to show a progress bar under (default: none)."""
    check = check or check_answer
    prompts = [encode_prompt(tokenizer, template, r["question"]) for r in records]
    total = max(len(p) for p in prompts) + max_new_tokens
    correct, samples = 0, []
    bar = Progress(len(records), progress, "problem", active=None if progress else False)
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
        bar.update(n, {"accuracy": f"{correct / (start + n):.3f}"})
    bar.close()
    return {"accuracy": correct / max(len(records), 1), "n": len(records), "samples": samples}


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
    min(batch_size, rows), the last padded, so `generate` compiles once; batch c draws with
    fold_in(key(seed), c): the samples depend on seed and batch_size. `progress`: a label to show
    a progress bar under (default: none)."""
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
    bar = Progress(len(owner), progress, "sample", active=None if progress else False)
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
        bar.update(len(rows), {"tok/s": f"{new_tokens / max(time.perf_counter() - start_time, 1e-9):,.0f}"})
    bar.close()
    seconds = time.perf_counter() - start_time
    return texts, {"batch_size": batch, "tokens_per_s": new_tokens / max(seconds, 1e-9),
                   "mean_new_tokens": new_tokens / len(owner)}


def sample_eval(graphdef: nnx.GraphDef, state: nnx.State, tokenizer: Tokenizer, template: str,
                records: list[dict], *, k: int, max_new_tokens: int, temperature: float = 0.6,
                top_p: float = 0.95, top_k: int = 0, seed: int = 0, batch_size: int = 128,
                ks: Sequence[int] | None = None, check: Check | None = None,
                answer_of: Callable[[str], str | None] | None = None, keep_completions: int = 4,
                max_chars: int = 2000, progress: str = "") -> dict:
    """Sample k completions of each record's prompt and score them as the R1 paper does (section 3.1:
    pass@1 over k samples at temperature 0.6, top-p 0.95; cons@k by majority vote).

    check(record, completion) -> bool: is a sample right (default: `rewards.check_answer`, the GRPO
    verdict). answer_of(completion) -> str | None: the answer it votes for (default:
    `rewards.extract_answer`), grouped by `metrics.answer_equivalence(record)`. ks: the pass@j to
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
    check = check or check_answer
    answer_of = answer_of or extract_answer
    texts, stats = sample_completions(graphdef, state, tokenizer, template, records, k=k,
                                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      top_k=top_k, seed=seed, batch_size=batch_size, progress=progress)
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
                    max_new_tokens: int, check: Check | None = None) -> Callable[[object], dict] | None:
    """The stage loop's eval_fn: greedy accuracy (`greedy_accuracy`, scored by `check`, default
    `rewards.check_answer`) of a train state (params + router_bias) on `records`, on `mesh`; None
    when there are no records."""
    if not records:
        return None

    def eval_fn(state) -> dict:
        model_state = nnx.merge_state(state.params, state.router_bias)
        with jax.set_mesh(mesh):
            out = greedy_accuracy(graphdef, model_state, tokenizer, template, records, max_new_tokens, check=check)
        return {"accuracy": float(out["accuracy"]), "n": out["n"], "samples": out["samples"]}

    return eval_fn
