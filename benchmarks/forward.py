#!/usr/bin/env python3
"""Forward-pass throughput of the tiny presets on the local device.

    .venv/bin/python benchmarks/forward.py [--batch 8] [--seq 256] [--iters 10]

Prints compile time and tokens/s for each tiny preset (with MTP where the preset has it).
"""

import argparse
import time
from pathlib import Path

import jax

from r1jax.config import load_config
from r1jax.models import forward, init_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--presets", nargs="*", default=["tiny_v3", "tiny_v2", "tiny_qwen2", "tiny_llama3"])
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}; batch {args.batch} x {args.seq}")
    for name in args.presets:
        cfg = load_config(ROOT / "configs" / "models" / f"{name}.yaml").model
        graphdef, state = init_model(cfg, jax.random.key(0))
        fwd = jax.jit(forward, static_argnums=0, static_argnames="with_mtp")
        tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 1, cfg.vocab_size)
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(graphdef, state, tokens, with_mtp=bool(cfg.mtp_depth)))
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(graphdef, state, tokens, with_mtp=bool(cfg.mtp_depth)))
            times.append(time.perf_counter() - t0)
        med = sorted(times)[len(times) // 2]
        print(f"  {name:12s} compile+first {compile_s:6.2f}s   median {med * 1e3:7.1f} ms   "
              f"{tokens.size / med:10,.0f} tokens/s")


if __name__ == "__main__":
    main()
