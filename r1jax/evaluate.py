"""Evaluation: greedy exact match on held-out problems (pass@k and cons@k arrive with the pipeline)."""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
from flax import nnx

from r1jax.sampling import generate, pad_prompts
from r1jax.tokenizer import Tokenizer, encode_prompt

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The text inside the last <answer>...</answer>, stripped; None if there is none."""
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


def exact_match(expected: str, completion: str) -> bool:
    got = extract_answer(completion)
    return got is not None and got == expected.strip()


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
