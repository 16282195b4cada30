#!/usr/bin/env python3
"""Accelerator figures of r1jax in one script: named sections, each a function returning rows of figures.

    python benchmarks/gpu.py [--size tiny|full] [--sections sft,decode,grpo] [--out results.json]
        [--reps N] [--peak-tflops T] [--hbm-tbs B]

--size full: configs/models/qwen2.5-1.5b.yaml (bfloat16 compute, the preset's param dtype, remat
full) with random weights: nothing is downloaded, no checkpoint is read. --size tiny:
configs/models/tiny_qwen2.yaml (float32, remat full) at short lengths, for CPU
(tests/test_gpu_benchmark.py): 2-3 minutes on 2 busy cores (under 2 minutes of CPU), nearly all
compilation.
Prints a markdown table per section, ready for BENCHMARKS.md; --out gets every figure as JSON
(device kind, versions, date, peaks used, each section's rows), rewritten after each section so
that a run cut short keeps what it measured. A section that fails is recorded as {"error": ...},
the next one still runs, and the exit status is 1. The JAX persistent compilation cache is off
(timings must not depend on what an earlier run left); compile times are reported apart from the
timed runs, which follow a warm-up run, are waited for (block_until_ready) and are medians of --reps.

Sections (SECTIONS below):

- sft: the jitted `r1jax.train.sft.sft_step`, built as `r1jax sft` builds it (make_context,
  init_train_state on the mesh, donated state, explicit shardings), on random rows of one document
  of S tokens each: S = 4096 and 32768 (tiny: 128 and 512), one row per step. compile_s is the AOT
  lower + compile. MFU = tokens/s x model FLOPs per token / (peak FLOP/s x devices). Model FLOPs per
  token follow PaLM (arXiv 2204.02311, appendix B), 6N + 12LHQT: N the matmul parameters a token
  passes through (the non-embedding parameters plus the output head; Qwen's tied table counts once,
  as the head; the input lookup is no matmul), L layers, H query heads, Q head dim, T = S. `mfu`
  counts causal attention once, i.e. half of PaLM's term, 6LHQ(T + 1) (the mean context of a causal
  row; `r1jax.summary.train_flops_per_token`, the MFU the stage loop logs); `mfu_palm` takes PaLM's
  12LHQT as written. Rematerialisation is not counted (model FLOPs, not hardware FLOPs). temp_gib
  is XLA's temporary buffer size of the compiled step (memory_analysis). The attention column is
  what `models.attention.attention_impl` picks for the training forward (packed rows: blockwise on
  GPU, since cuDNN takes only single-document rows).
- decode: `r1jax.sampling.generate`, greedy, no eos (every row runs to the end), batch 1 and 256
  (tiny: 1 and 8), prompt P = 64 random ids, N = 256 new tokens (tiny: 16 and 32), one program
  per batch: t(N) is the median time of a run with no eos, t(1) of the same program with eos set to
  the first token every row samples (the rows share one prompt), so that every row stops after it;
  the two take turns. Decode tokens/s = B (N - 1) / (t(N) - t(1)).
  HBM bound = bandwidth / the bytes one decode step must read (`benchmarks/sampler.py`
  decode_bytes_per_step: every parameter once, the tied table as the head, plus the K/V cache of
  B rows at the mean context P + N/2; the sampler reads the cache in blocks of
  model.attention_block positions, so it reads more than this at short contexts); hbm_share =
  measured / bound. The compute bound (2 N_matmul + attention FLOPs per token at peak) sits beside
  it in the JSON: at batch 256 it is about as tight as the HBM bound.
- grpo: iterations of `r1jax.stages.grpo.GRPOIteration` (what `r1jax grpo` runs each iteration:
  in-graph rollout, host scoring, advantages, the pi_old and pi_ref log-prob passes, one update),
  16 prompts x G = 8, P = 64, N = 512, beta 0.001 (R1-Zero's), one minibatch of train.grad_accum 8
  microbatches (tiny: 2 x 4, P 8, N 16, grad_accum 1). The reward is a host function of the ids
  (the share of even ids, no reward workers); the tokenizer is bare ids, its eos the last id, which
  is never sampled (vocab_limit), so every row runs to N. The first iteration (compilation) is
  dropped; figures are medians of the --reps that follow. tokens/s = (generated + trained tokens) /
  iteration seconds, as the stage loop counts them (trained: the whole rows, prompts included, x
  inner epochs); generation_share = rollout seconds (generate, the host copy and the decoding of the
  responses) / iteration seconds. compile_s = first iteration - median iteration.

- gmm: the routed experts' grouped matmul (`models/gmm.py` grouped_matmul), forward + backward of
  x [rows, d] @ w [E, d, f] in bfloat16 at a DeepSeek-V3 expert shard's shape (32,768 rows of
  7,168 x 2,048, 8 local experts; tiny: 256 x 128 x 128, 4), one row per implementation:
  mosaic_gpu (the Hopper Mosaic-GPU kernels, on a Hopper GPU only), tiled (the fallback) and
  ragged_dot (XLA's; dense masked outside TPU).

Peaks: bf16 dense FLOP/s by device kind from `r1jax.stages.loop.PEAK_FLOPS` (H200 and H100 989,
A100 312 TFLOP/s: datasheets) and HBM bandwidth from HBM_BYTES_PER_S (H200 4.8, H100 3.35, A100 2.0
TB/s: datasheets), or --peak-tflops / --hbm-tbs; on a device in neither table (CPU) MFU and shares
are n/a (null). One H200 measured 770-800 TFLOP/s (a bf16 8192^3 matmul) and 4.3 TB/s (a
device-to-device copy): pass such measured ceilings to read the figures against them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_trl import IdTokenizer, r1jax_reward  # noqa: E402  (benchmarks/grpo_trl.py: the same tokenizer and reward)
from sampler import decode_bytes_per_step  # noqa: E402  (benchmarks/sampler.py)

from r1jax.config import Config, load_config  # noqa: E402
from r1jax.models import init_model  # noqa: E402
from r1jax.models.attention import attention_impl  # noqa: E402
from r1jax.sampling import generate, pad_prompts  # noqa: E402
from r1jax.sharding import batch_sharding, make_mesh  # noqa: E402
from r1jax.stages.grpo import GRPOIteration  # noqa: E402
from r1jax.stages.loop import peak_flops_per_device  # noqa: E402
from r1jax.summary import count_params, train_flops_per_token  # noqa: E402
from r1jax.train.grpo import GRPOLoss, grpo_wrap  # noqa: E402
from r1jax.train.sft import sft_step  # noqa: E402
from r1jax.train.state import init_train_state, make_context, train_state_shardings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# HBM bandwidth per chip by device kind (datasheets), first match wins.
HBM_BYTES_PER_S = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12))


@dataclasses.dataclass(frozen=True)
class Size:
    """What a --size runs: the model preset and its overrides, and each section's shapes."""

    preset: str  # configs/models/<preset>.yaml
    overrides: tuple[str, ...]
    sft_seqs: tuple[int, ...]  # tokens per row
    sft_batch: int  # rows per step
    decode_batches: tuple[int, ...]
    decode_prompt: int
    decode_new: int
    grpo_prompts: int
    grpo_group: int
    grpo_prompt: int
    grpo_new: int
    grpo_grad_accum: int
    reps: int  # timed runs of sft and decode (after a warm-up)
    grpo_reps: int  # timed GRPO iterations (after a warm-up iteration)
    gmm_shape: tuple[int, int, int, int] = (256, 128, 128, 4)  # rows, d_model, expert hidden, local experts


SIZES = {
    "tiny": Size("tiny_qwen2", ("model.remat=full",), sft_seqs=(128, 512), sft_batch=1, decode_batches=(1, 8),
                 decode_prompt=16, decode_new=32, grpo_prompts=2, grpo_group=4, grpo_prompt=8, grpo_new=16,
                 grpo_grad_accum=1, reps=5, grpo_reps=2),
    "full": Size("qwen2.5-1.5b", ("model.remat=full", "model.dtype=bfloat16"),
                 sft_seqs=(4096, 32768), sft_batch=1, decode_batches=(1, 256), decode_prompt=64, decode_new=256,
                 grpo_prompts=16, grpo_group=8, grpo_prompt=64, grpo_new=512, grpo_grad_accum=8, reps=5,
                 grpo_reps=2, gmm_shape=(32768, 7168, 2048, 8)),
}


@dataclasses.dataclass(frozen=True)
class Peaks:
    flops: float | None  # FLOP/s per device
    flops_from: str | None
    hbm: float | None  # bytes/s per device
    hbm_from: str | None


def peaks(args) -> Peaks:
    kind = jax.devices()[0].device_kind.lower()
    flops, flops_from = (args.peak_tflops * 1e12, "--peak-tflops") if args.peak_tflops else (None, None)
    if flops is None and (flops := peak_flops_per_device()):
        flops_from = "table"
    hbm, hbm_from = (args.hbm_tbs * 1e12, "--hbm-tbs") if args.hbm_tbs else (None, None)
    if hbm is None:
        hbm = next((b for name, b in HBM_BYTES_PER_S if name.lower() in kind), None)
        hbm_from = "table" if hbm else None
    return Peaks(flops, flops_from, hbm, hbm_from)


def load(size: Size, *overrides: str) -> Config:
    return load_config(ROOT / "configs" / "models" / f"{size.preset}.yaml", [*size.overrides, *overrides])


def timed(fn: Callable, reps: int) -> list[float]:
    """Seconds of `reps` calls of fn(), each waited for to the end (block_until_ready)."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def share(x: float, bound: float | None) -> float | None:
    return None if bound is None else x / bound


# --------------------------------------------------------------------------------------------------
# sft
# --------------------------------------------------------------------------------------------------


def sft_batch(rows: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """[rows, seq] arrays of sft_step's batch (see r1jax.train.sft): one document of random ids per
    row, every next-token target trained."""
    ids = np.random.default_rng(seed).integers(1, vocab, (rows, seq + 1)).astype(np.int32)
    return {"tokens": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((rows, seq), np.float32),
            "segment_ids": np.ones((rows, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy()}


def sft_flops_per_token(cfg, seq: int) -> tuple[float, float]:
    """(causal: attention counted once, as the trainer's MFU; PaLM's 6N + 12LHQT as written)."""
    m = cfg.model
    dqk, dv = (m.qk_head_dim, m.v_head_dim) if m.is_mla else (m.gqa_head_dim, m.gqa_head_dim)
    palm = 6.0 * count_params(m).active + 6.0 * m.n_layers * m.n_heads * (dqk + dv) * seq
    return train_flops_per_token(m, seq), palm


def temp_gib(compiled) -> float | None:
    analysis = compiled.memory_analysis()  # None where the backend gives none
    return None if analysis is None else analysis.temp_size_in_bytes / 2**30


def sft_row(step, holder: dict, cfg: Config, seq: int, rows, reps: int, pk: Peaks) -> dict:
    """Compile `step` for rows of `seq` tokens and time it on holder["state"] (donated, replaced by
    each step's result). Runs under the mesh of `rows`."""
    b = cfg.train.batch_size
    batch = jax.device_put(sft_batch(b, seq, cfg.model.vocab_size), rows)
    rng = jax.random.key(1)
    t0 = time.perf_counter()
    compiled = step.lower(holder["state"], batch, rng).compile()
    compile_s = time.perf_counter() - t0

    def run():
        holder["state"], holder["metrics"] = compiled(holder["state"], batch, rng)
        return holder["state"], holder["metrics"]

    timed(run, 1)  # warm-up
    times = timed(run, reps)
    loss = float(holder["metrics"]["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"sft at {seq} tokens: loss {loss}")
    step_s = statistics.median(times)
    causal, palm = sft_flops_per_token(cfg, seq)
    tps = b * seq / step_s
    n_dev = jax.device_count()
    peak = None if pk.flops is None else pk.flops * n_dev
    m = cfg.model
    dk = m.qk_head_dim if m.is_mla else m.gqa_head_dim
    impl = attention_impl(m, jnp.dtype(m.dtype), dk, m.v_head_dim if m.is_mla else dk, single_documents=False)
    return {"seq_len": seq, "batch": b, "tokens": b * seq, "attention": impl, "remat": m.remat, "dtype": m.dtype,
            "compile_s": compile_s, "step_s": step_s, "step_s_all": times, "tokens_per_s": tps,
            "flops_per_token": causal, "flops_per_token_palm": palm, "tflops_per_s": tps * causal / 1e12 / n_dev,
            "mfu": share(tps * causal, peak), "mfu_palm": share(tps * palm, peak), "loss": loss,
            "temp_gib": temp_gib(compiled)}


def sft_section(size: Size, args, pk: Peaks) -> list[dict]:
    """One train state for every length (train.seq_len is no part of the step's context); one
    compilation of the step per length."""
    cfgs = [load(size, f"train.seq_len={s}", f"train.batch_size={size.sft_batch}", "train.mtp=false")
            for s in size.sft_seqs]
    ctx = make_context(cfgs[0])
    mesh = make_mesh(cfgs[0].mesh, model=cfgs[0].model)
    shardings, rows = train_state_shardings(ctx, mesh), batch_sharding(mesh)
    step = jax.jit(functools.partial(sft_step, ctx=ctx), donate_argnums=0, in_shardings=(shardings, rows, None),
                   out_shardings=(shardings, None))
    with jax.set_mesh(mesh):
        holder = {"state": init_train_state(ctx, jax.random.key(0), mesh)}
        return [sft_row(step, holder, cfg, cfg.train.seq_len, rows, args.reps or size.reps, pk) for cfg in cfgs]


# --------------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------------


def decode_row(cfg, graphdef, state, b: int, size: Size, reps: int, pk: Peaks) -> dict:
    """One compiled generate (N new tokens into a buffer of P + N) timed twice over: t(N) with no eos,
    every row running to N; t(1) with eos set to the first token the rows sample, so that every row
    stops after it. Every row holds the same prompt, so they all sample that same first token."""
    p, n = size.decode_prompt, size.decode_new
    prompt = np.random.default_rng(b).integers(1, cfg.vocab_size, (p,)).astype(np.int32)
    buf = np.zeros((b, p + n), np.int32)
    buf[:, :p] = prompt
    lens, key = np.full((b,), p, np.int32), jax.random.key(0)
    t0 = time.perf_counter()
    compiled = generate.lower(graphdef, state, buf, lens, key, max_new_tokens=n, eos_id=-1).compile()
    compile_s = time.perf_counter() - t0
    out = jax.device_get(compiled(state, buf, lens, key, eos_id=-1))  # warm-up
    first = out["tokens"][:, p]
    if not ((out["num_new"] == n).all() and (first == first[0]).all()):
        raise RuntimeError(f"decode batch {b}: rows stopped early or sampled different first tokens")
    runs = {k: functools.partial(compiled, state, buf, lens, key, eos_id=eos)
            for k, eos in ((1, int(first[0])), (n, -1))}
    if not (np.asarray(jax.device_get(runs[1]()["num_new"])) == 1).all():  # warm-up of the 1-step run
        raise RuntimeError(f"decode batch {b}: eos {first[0]} did not stop every row after one token")
    times = {1: [], n: []}
    for _ in range(reps):  # the two take turns: a change in machine load hits both
        for k in (1, n):
            times[k] += timed(runs[k], 1)
    t1, tn = statistics.median(times[1]), statistics.median(times[n])
    if tn <= t1:
        raise RuntimeError(f"decode batch {b}: t({n}) = {tn:.4f} s <= t(1) = {t1:.4f} s; raise --reps")
    step_s = (tn - t1) / (n - 1)
    context = p + n / 2
    step_bytes = decode_bytes_per_step(cfg, state, b, context)
    dqk, dv = (cfg.qk_head_dim, cfg.v_head_dim) if cfg.is_mla else (cfg.gqa_head_dim, cfg.gqa_head_dim)
    token_flops = 2.0 * count_params(cfg).active + 2.0 * cfg.n_layers * cfg.n_heads * (dqk + dv) * context
    hbm_bound = None if pk.hbm is None else b * pk.hbm / step_bytes
    flops_bound = None if pk.flops is None else pk.flops / token_flops
    tps = b / step_s
    return {"batch": b, "prompt": p, "new_tokens": n, "compile_s": compile_s, "prefill_plus_one_s": t1,
            "generate_s": tn, "step_ms": step_s * 1e3, "tokens_per_s": tps, "bytes_per_step": step_bytes,
            "hbm_bound_tokens_per_s": hbm_bound, "hbm_share": share(tps, hbm_bound),
            "flops_bound_tokens_per_s": flops_bound, "flops_share": share(tps, flops_bound)}


def decode_section(size: Size, args, pk: Peaks) -> list[dict]:
    cfg = load(size).model
    graphdef, state = init_model(cfg, jax.random.key(0))
    return [decode_row(cfg, graphdef, state, b, size, args.reps or size.reps, pk) for b in size.decode_batches]


# --------------------------------------------------------------------------------------------------
# grpo
# --------------------------------------------------------------------------------------------------


def time_parts(obj, names: tuple[str, ...], log: dict) -> None:
    """Replace each bound method obj.name by one that appends its seconds to log[name], waiting for
    the arrays it returns (in the fields of a returned dataclass too)."""
    for name in names:
        inner, log[name] = getattr(obj, name), []

        def wrapped(*a, _inner=inner, _name=name, **k):
            t0 = time.perf_counter()
            out = _inner(*a, **k)
            jax.block_until_ready(vars(out) if dataclasses.is_dataclass(out) else out)
            log[_name].append(time.perf_counter() - t0)
            return out

        setattr(obj, name, wrapped)


GRPO_PARTS = ("rollout", "score", "logprob_passes", "updates")


def grpo_section(size: Size, args, pk: Peaks) -> list[dict]:
    reps = args.reps or size.grpo_reps
    prompts, group, new = size.grpo_prompts, size.grpo_group, size.grpo_new
    total = size.grpo_prompt + new
    cfg = load(size, f"train.seq_len={total}", f"train.batch_size={prompts * group}", f"train.steps={reps + 1}",
               f"train.grad_accum={size.grpo_grad_accum}", "train.mtp=false", f"grpo.group_size={group}",
               f"grpo.prompts_per_step={prompts}", "grpo.beta=0.001", f"sampling.max_new_tokens={new}",
               "sampling.temperature=1.0", "optimizer.lr=1e-6", "optimizer.schedule=constant",
               "optimizer.warmup_steps=0")
    g = cfg.grpo
    ctx = make_context(cfg, schedule_steps=cfg.train.steps * g.inner_epochs * g.minibatches,
                       loss=GRPOLoss.from_config(cfg))
    mesh = make_mesh(cfg.mesh, model=cfg.model)
    tok = IdTokenizer(cfg.model.vocab_size)
    ids = np.random.default_rng(0).integers(0, tok.vocab_size, (prompts, size.grpo_prompt)).astype(np.int32)
    tokens, lengths = pad_prompts(list(ids), total, tok.pad_id)  # PromptStream's layout
    batch = {"records": [{"id": f"p{i}"} for i in range(prompts)], "tokens": tokens, "lengths": lengths}
    parts, seconds = {}, []
    with jax.set_mesh(mesh):
        state = grpo_wrap(g.beta)(init_train_state(ctx, jax.random.key(0), mesh),
                                  functools.partial(jax.tree.map, jnp.copy))
        iteration = GRPOIteration(cfg, ctx, mesh, tok, r1jax_reward)
        time_parts(iteration, GRPO_PARTS, parts)
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            state, metrics = iteration(state, batch, jax.random.key(0))
            jax.block_until_ready(state)
            seconds.append(time.perf_counter() - t0)
    it_s = statistics.median(seconds[1:])
    med = {name: statistics.median(v[1:]) for name, v in parts.items()}
    tokens_it = metrics["sampled_tokens"] + metrics["trained_tokens"]
    return [{"prompts": prompts, "group": group, "prompt": size.grpo_prompt, "new_tokens": new,
             "grad_accum": size.grpo_grad_accum, "beta": g.beta, "compile_s": seconds[0] - it_s,
             "iteration_s": it_s, "iteration_s_all": seconds, "rollout_s": med["rollout"], "score_s": med["score"],
             "logprob_s": med["logprob_passes"], "update_s": med["updates"],
             "generation_share": statistics.median(r / s for r, s in zip(parts["rollout"][1:], seconds[1:])),
             "sampled_tokens": metrics["sampled_tokens"], "trained_tokens": metrics["trained_tokens"],
             "tokens_per_s": tokens_it / it_s, "sampled_tokens_per_s": metrics["sampled_tokens"] / med["rollout"],
             "updates": metrics["updates"], "loss": metrics["loss"]}]


def gmm_section(size: Size, args, pk: Peaks) -> list[dict]:
    """The routed experts' grouped matmul, forward + backward (dx and dw) of x [rows, d] @ w [E, d, f]
    in bfloat16, rows split unevenly over the E groups (2:1:1:... with a last group of 0), one row
    per implementation of models/gmm.py: mosaic_gpu (the Hopper kernels; only on a Hopper GPU),
    tiled (the fallback), ragged_dot (XLA's; dense masked outside TPU). FLOPs: 6 rows d f."""
    from r1jax.models.gmm import _is_hopper, grouped_matmul

    rows, d, f, e = size.gmm_shape
    weights = np.array([2.0] + [1.0] * (e - 2) + [0.0])
    gs = np.floor(rows * weights / weights.sum()).astype(np.int32)
    gs[0] += rows - gs.sum()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(rows, d)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(e, d, f)) * 0.02, jnp.bfloat16)
    gsj = jnp.asarray(gs)
    out = []
    for impl in (["mosaic_gpu"] if _is_hopper() else []) + ["tiled", "ragged_dot"]:
        def loss(a, b, impl=impl):
            return jnp.sum(grouped_matmul(a, b, gsj, impl).astype(jnp.float32) ** 2)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        t0 = time.perf_counter()
        compiled = step.lower(x, w).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(x, w))  # warm-up
        secs = statistics.median(timed(lambda: compiled(x, w), args.reps or size.reps))
        flops = 6 * rows * d * f
        out.append({"impl": impl, "rows": rows, "d": d, "f": f, "groups": e, "compile_s": compile_s,
                    "fwd_bwd_ms": secs * 1e3, "tflops_per_s": flops / secs / 1e12,
                    "mfu": flops / secs / pk.flops if pk.flops else None})
    return out


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Section:
    """A named part of the run: run(size, args, peaks) -> rows (dicts of figures); the table shows
    `columns` as (row key, header, format) and the JSON every key."""

    run: Callable
    title: str
    note: str  # how the figures are made, one line under the table's heading
    columns: tuple[tuple[str, str, str], ...]


SECTIONS = {
    "sft": Section(sft_section, "SFT step (sft_step, donated state), one document per row", (
        "Model FLOPs per token 6N + attention (PaLM app. B), N the matmul params (tied head included); MFU (causal): "
        "attention 6LHQ(T+1), half of PaLM's 12LHQT; MFU (PaLM): 12LHQT. Compile: AOT lower + compile."), (
        ("seq_len", "tokens/row", "{:,}"), ("batch", "rows", "{}"), ("attention", "attention", "{}"),
        ("compile_s", "compile", "{:.1f} s"), ("step_s", "step (median)", "{:.4f} s"),
        ("tokens_per_s", "tokens/s", "{:,.0f}"), ("tflops_per_s", "model TFLOP/s", "{:.3g}"),
        ("mfu", "MFU (causal)", "{:.1%}"), ("mfu_palm", "MFU (PaLM 12LHQT)", "{:.1%}"),
        ("temp_gib", "XLA temp", "{:.2f} GiB"))),
    "decode": Section(decode_section, "decode (generate, greedy, no eos)", (
        "Decode tokens/s = B (N - 1) / (t(N) - t(1)), one program; HBM bound = bandwidth / (params + K/V cache "
        "of B rows at P + N/2) bytes per step; compute bound = peak / (2 N_matmul + attention) FLOPs per token."), (
        ("batch", "batch", "{}"), ("prompt", "prompt", "{}"), ("new_tokens", "new", "{}"),
        ("compile_s", "compile", "{:.1f} s"), ("prefill_plus_one_s", "prefill + 1 token", "{:.4f} s"),
        ("step_ms", "decode step", "{:.3f} ms"), ("tokens_per_s", "decode tokens/s", "{:,.0f}"),
        ("hbm_bound_tokens_per_s", "HBM bound tokens/s", "{:,.0f}"), ("hbm_share", "share of HBM bound", "{:.1%}"),
        ("flops_share", "share of compute bound", "{:.1%}"))),
    "grpo": Section(grpo_section, "GRPO iteration (GRPOIteration: rollout, rewards, log-prob passes, update)", (
        "tokens/s = (generated + trained tokens) / iteration, trained = whole rows; generation share = rollout "
        "(generate + host decode) / iteration; beta 0.001 (pi_ref pass), one update; median after a warm-up."), (
        ("prompts", "prompts", "{}"), ("group", "G", "{}"), ("prompt", "prompt", "{}"), ("new_tokens", "new", "{}"),
        ("compile_s", "compile (first - median)", "{:.1f} s"), ("iteration_s", "iteration", "{:.3f} s"),
        ("rollout_s", "rollout", "{:.3f} s"), ("logprob_s", "log-prob passes", "{:.3f} s"),
        ("update_s", "update", "{:.3f} s"), ("tokens_per_s", "tokens/s (generated + trained)", "{:,.0f}"),
        ("sampled_tokens_per_s", "generated tokens/s", "{:,.0f}"),
        ("generation_share", "generation share", "{:.1%}"))),
    "gmm": Section(gmm_section, "grouped matmul of the routed experts, forward + backward (models/gmm.py)", (
        "x [rows, d] @ w [E, d, f] bfloat16, rows over E groups 2:1:...:1:0; FLOPs 6 rows d f (y, dx, dw); "
        "mosaic_gpu only on Hopper; ragged_dot is XLA's, dense masked outside TPU; median after a warm-up."), (
        ("impl", "impl", "{}"), ("rows", "rows", "{:,}"), ("d", "d", "{}"), ("f", "f", "{}"),
        ("groups", "groups", "{}"), ("compile_s", "compile", "{:.1f} s"), ("fwd_bwd_ms", "fwd + bwd", "{:.3f} ms"),
        ("tflops_per_s", "TFLOP/s", "{:.3g}"), ("mfu", "share of peak", "{:.1%}"))),
}


def markdown(section: Section, rows: list[dict]) -> str:
    cols = section.columns
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("n/a" if r.get(k) is None else f.format(r[k]) for k, _, f in cols) + " |")
    return "\n".join(lines)


def section_text(name: str, result: dict) -> str:
    rows = result["sections"][name]
    return f"FAILED: {rows['error']}" if isinstance(rows, dict) else f"{SECTIONS[name].note}\n\n" + markdown(
        SECTIONS[name], rows)


def header(args, size: Size, pk: Peaks) -> dict:
    dev, m = jax.devices()[0], load(size).model
    return {"command": " ".join(["python", *sys.argv]), "size": args.size, "preset": size.preset,
            "overrides": list(size.overrides), "param_dtype": m.param_dtype, "dtype": m.dtype, "remat": m.remat,
            "platform": dev.platform, "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "jax_version": jax.__version__,
            "jaxlib_version": importlib.metadata.version("jaxlib"),
            "flax_version": flax.__version__, "python": sys.version.split()[0],
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "compilation_cache": bool(jax.config.jax_enable_compilation_cache),
            "peak_flops_per_device": pk.flops, "peak_flops_from": pk.flops_from,
            "hbm_bytes_per_s": pk.hbm, "hbm_from": pk.hbm_from, "sections": {}, "section_seconds": {}}


def write(path: str | None, result: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=1, default=float) + "\n")


def parse(argv=None):
    p = argparse.ArgumentParser(description="r1jax accelerator benchmarks (see the module docstring)")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--out", default=None, help="JSON file of every figure (rewritten after each section)")
    p.add_argument("--reps", type=int, default=0, help="timed runs per figure (0: the size's default)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak FLOP/s per device for MFU (0: by device kind)")
    p.add_argument("--hbm-tbs", type=float, default=0.0, help="HBM TB/s per device for the decode bound (0: by kind)")
    args = p.parse_args(argv)
    names = [s for s in args.sections.split(",") if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        p.error(f"--sections: unknown {unknown} (known: {', '.join(SECTIONS)})" if unknown else "--sections: none")
    args.sections = names
    return args


def main(argv=None) -> int:
    args = parse(argv)
    jax.config.update("jax_enable_compilation_cache", False)  # before anything compiles (JAX_COMPILATION_CACHE_DIR too)
    size, pk = SIZES[args.size], peaks(args)
    result = header(args, size, pk)
    print(f"{result['device_kind']} x{result['device_count']} ({result['platform']}), jax {result['jax_version']}, "
          f"flax {result['flax_version']}; {args.size}: {size.preset}", flush=True)
    write(args.out, result)  # the machine and versions, whatever happens next
    failed = False
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            result["sections"][name] = SECTIONS[name].run(size, args, pk)
        except Exception as e:  # record it and go on: a lease is too short to lose the other sections
            traceback.print_exc()
            result["sections"][name], failed = {"error": f"{type(e).__name__}: {e}"}, True
        result["section_seconds"][name] = time.perf_counter() - t0
        print(f"section {name}: {result['section_seconds'][name]:.1f} s\n{section_text(name, result)}", flush=True)
        write(args.out, result)
        jax.clear_caches()
        gc.collect()
    print(f"\n## Accelerator figures: `{result['command']}`\n\n{result['device_kind']} x{result['device_count']} "
          f"({result['platform']}), jax {result['jax_version']}, flax {result['flax_version']}, {result['date']}; "
          f"{size.preset} ({result['param_dtype']} params, {result['dtype']} compute, remat {result['remat']}), "
          "random weights; peak "
          + (f"{pk.flops / 1e12:.0f} TFLOP/s ({pk.flops_from})" if pk.flops else "n/a")
          + ", HBM " + (f"{pk.hbm / 1e12:.2f} TB/s ({pk.hbm_from})" if pk.hbm else "n/a")
          + "; compilation cache off; medians after a warm-up.")
    for name in args.sections:
        print(f"\n### {name}: {SECTIONS[name].title}\n\n{section_text(name, result)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
