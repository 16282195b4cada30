#!/usr/bin/env python3
"""One jitted SFT step at long sequences, before and after issue 12's attention and loss changes.

    .venv/bin/python benchmarks/sft_long.py [--presets tiny_qwen2 tiny_v3] [--seq 2048 8192]
        [--reps 5] [--max-temp-gib 12]

For each tiny preset (configs/models/) and sequence length S, one row of S tokens (one document,
every target trained) goes through `r1jax.train.sft.sft_step`, jitted with the state donated, in
two variants of the same model:

- before: `model.attention=dense model.logits_chunk=0` (the [S, S] scores and the [S, vocab]
  logits built whole, as before issue 12);
- after: the defaults (`model.attention=auto`, blockwise on CPU in blocks of
  `model.attention_block`=512; the loss's output head in chunks of `model.logits_chunk`=1024).

Per variant: XLA's temp bytes of the compiled step (`memory_analysis()`, on abstract inputs as in
tests/test_attention_impl.py), compile time, and the median step time of --reps steps after one
warm-up step, the two variants taking turns so that a change of machine load hits both alike.
tokens/s = S / median step time. A variant whose temp bytes exceed --max-temp-gib is compiled but
not run (its figures say so). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.config import load_config
from r1jax.train.sft import BATCH_KEYS, sft_step
from r1jax.train.state import abstract_train_state, init_train_state, make_context

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"before": ["model.attention=dense", "model.logits_chunk=0"], "after": []}


def batch_of(s: int, vocab: int, seed: int = 0) -> dict:
    """One row of s random tokens as one document, every next token a trained target: [1, s] int32."""
    tokens = np.random.default_rng(seed).integers(1, vocab, (1, s + 1)).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((1, s), np.int32),
            "segment_ids": np.ones((1, s), np.int32), "positions": np.arange(s, dtype=np.int32)[None]}


def variant(preset: str, s: int, overrides: list[str], max_temp: float) -> dict:
    """Compile one variant's step; build its state unless its temp bytes exceed max_temp."""
    cfg = load_config(ROOT / "configs" / "models" / f"{preset}.yaml",
                      ["mesh.fsdp=1", f"model.max_seq_len={s}", f"train.seq_len={s}", "train.batch_size=1",
                       *overrides])
    ctx = make_context(cfg)
    step = jax.jit(functools.partial(sft_step, ctx=ctx), donate_argnums=0)
    abstract = {k: jax.ShapeDtypeStruct((1, s), jnp.int32) for k in BATCH_KEYS}
    t0 = time.perf_counter()
    compiled = step.lower(abstract_train_state(ctx), abstract, None).compile()
    out = {"compile": time.perf_counter() - t0, "temp": compiled.memory_analysis().temp_size_in_bytes,
           "impl": cfg.model.attention, "chunk": cfg.model.logits_chunk, "times": []}
    if out["temp"] <= max_temp:
        out["step"], out["state"] = compiled, init_train_state(ctx, jax.random.key(0))
        out["batch"] = {k: jnp.asarray(v) for k, v in batch_of(s, cfg.model.vocab_size).items()}
    return out


def run_step(v: dict) -> float:
    t0 = time.perf_counter()
    v["state"], m = v["step"](v["state"], v["batch"], None)
    jax.block_until_ready((v["state"], m))
    return time.perf_counter() - t0


def bench(preset: str, s: int, reps: int, max_temp: float) -> dict:
    vs = {name: variant(preset, s, ov, max_temp) for name, ov in VARIANTS.items()}
    live = [v for v in vs.values() if "step" in v]
    for v in live:
        v["first"] = run_step(v)  # warm-up
    for _ in range(reps):
        for v in live:
            v["times"].append(run_step(v))
    for v in live:
        v["median"] = statistics.median(v["times"])
        v.pop("state"), v.pop("step"), v.pop("batch")
    return vs


def main() -> None:
    p = argparse.ArgumentParser(description="SFT step at long sequences: dense + whole logits vs the defaults")
    p.add_argument("--presets", nargs="+", default=["tiny_qwen2", "tiny_v3"])
    p.add_argument("--seq", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--reps", type=int, default=5, help="timed steps per variant after one warm-up step")
    p.add_argument("--max-temp-gib", type=float, default=12.0, help="compile only (no run) above this temp size")
    args = p.parse_args()
    dev = jax.devices()[0]
    facts = (f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}) x{len(jax.devices())}; "
             f"{platform.machine()} {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(facts, flush=True)
    rows = []
    for preset in args.presets:
        for s in args.seq:
            vs = bench(preset, s, args.reps, args.max_temp_gib * 2**30)
            rows.append((preset, s, vs))
            for name, v in vs.items():
                ran = f"median {v['median'] * 1e3:.0f} ms" if "median" in v else "not run"
                print(f"  {preset} S={s} {name}: temp {v['temp'] / 2**20:,.0f} MiB, compile {v['compile']:.1f} s, "
                      f"{ran}", flush=True)
    print(f"\n`{' '.join(['python', *sys.argv])}`\n\n{facts}; one row of S tokens per step, median of {args.reps} "
          "steps after a warm-up step, the variants taking turns.\n")
    print("| preset | S | before: temp | after: temp | temp before / after | before: step | after: step | "
          "before tokens/s | after tokens/s | after / before tokens/s | compile before / after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for preset, s, vs in rows:
        b, a = vs["before"], vs["after"]
        ms = lambda v: f"{v['median'] * 1e3:,.0f} ms" if "median" in v else "not run"  # noqa: E731
        tps = lambda v: f"{s / v['median']:,.0f}" if "median" in v else "-"  # noqa: E731
        speed = f"{b['median'] / a['median']:.2f}x" if "median" in a and "median" in b else "-"
        print(f"| {preset} | {s} | {b['temp'] / 2**20:,.0f} MiB | {a['temp'] / 2**20:,.0f} MiB | "
              f"{b['temp'] / a['temp']:.1f}x | {ms(b)} | {ms(a)} | {tps(b)} | {tps(a)} | {speed} | "
              f"{b['compile']:.1f} / {a['compile']:.1f} s |")
    for preset in args.presets:
        temps = {s: vs for p_, s, vs in rows if p_ == preset}
        if len(temps) >= 2:
            lo, hi = min(temps), max(temps)
            print(f"\n{preset}: temp bytes {lo} -> {hi} tokens grow {temps[hi]['before']['temp'] / temps[lo]['before']['temp']:.1f}x "
                  f"before, {temps[hi]['after']['temp'] / temps[lo]['after']['temp']:.1f}x after", end="")
    print()


if __name__ == "__main__":
    main()
