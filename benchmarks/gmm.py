#!/usr/bin/env python3
"""Grouped matmul (MoE experts): the tiled form against jax.lax.ragged_dot on this backend.

    .venv/bin/python benchmarks/gmm.py [--rows 16384 --d 128 --f 96 --groups 8]
"""

import argparse
import time

import jax
import jax.numpy as jnp

from r1jax.models.gmm import tiled_gmm


def timed(fn, *args, iters=10):
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--f", type=int, default=96)
    ap.add_argument("--groups", type=int, default=8)
    a = ap.parse_args()
    x = jax.random.normal(jax.random.key(0), (a.rows, a.d))
    w = jax.random.normal(jax.random.key(1), (a.groups, a.d, a.f))
    gs = jnp.full((a.groups,), a.rows // a.groups, jnp.int32)
    flops = 2 * a.rows * a.d * a.f
    print(f"backend {jax.default_backend()}, rows {a.rows}, {a.d}->{a.f}, {a.groups} groups")
    for name, fn in [("tiled", jax.jit(tiled_gmm)), ("ragged_dot", jax.jit(jax.lax.ragged_dot))]:
        dt = timed(fn, x, w, gs)
        print(f"  {name:11s} {dt * 1e3:8.2f} ms  {flops / dt / 1e9:7.1f} useful GFLOP/s")
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(tiled_gmm(x, w, gs) ** 2), argnums=(0, 1)))
    print(f"  tiled fwd+bwd {timed(grad, x, w) * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
