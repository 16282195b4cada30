"""How often the training forward's router disagrees with the sampler's, and what routing replay
does to the sampler/trainer log-prob gap (issue 14 item 5). CPU, the tiny DeepSeek-V3 of the tests.

    .venv/bin/python benchmarks/routing_replay.py

For each compute dtype, 6 prompts x 2 samples of 24 new tokens at temperature 1 are drawn with
`generate(record_routes=True)`; the training forward then runs over the sampled rows without and
with the recorded routes. Printed per dtype: the (token, MoE layer) selections the sampler made,
how many of them the training forward selects differently without replay (with replay: always
none), and the gap |log pi_train - log pi_sampler| over the sampled tokens (mean and max).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.config import load_config
from r1jax.models import init_model
from r1jax.sampling import generate, pad_prompts
from r1jax.stages.grpo import sampler_logp_rows
from r1jax.train.grpo import rollout_batch
from r1jax.train.losses import sampled_logprobs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def measure(dtype: str, group: int = 2, new: int = 24) -> dict:
    cfg = dataclasses.replace(load_config(CONFIGS / "models" / "tiny_v3.yaml").model, dtype=dtype, mtp_depth=0)
    graphdef, state = init_model(cfg, jax.random.key(0))
    state = jax.tree.map(lambda a: a * 3 if a.ndim >= 2 else a, state)  # peaked, varied predictions
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, cfg.vocab_size, n).astype(np.int32) for n in (5, 11, 2, 8, 7, 3)]
    toks, lens = pad_prompts(prompts, 40, 0)
    out = generate(graphdef, state, toks, lens, jax.random.key(0), max_new_tokens=new, eos_id=-1, temperature=1.0,
                   samples_per_prompt=group, record_routes=True)
    plens = jnp.asarray(np.repeat(lens, group))
    routes = np.asarray(out["routes"])
    rows = rollout_batch(out["tokens"], plens, out["lengths"])
    placed, mask = sampler_logp_rows(out["logprobs"], plens, out["num_new"], out["tokens"].shape[1])

    @jax.jit
    def forward(r):
        model = nnx.merge(graphdef, state)
        logits, aux = model(rows["tokens"], rows["positions"], rows["segment_ids"], routes=r, want_routes=True)
        gap = jnp.abs(sampled_logprobs(logits, rows["targets"])[0] - placed) * mask
        return aux["routes"], gap

    recorded = routes[..., 0] >= 0
    result = {"dtype": dtype, "selections": int(recorded.sum())}
    for name, r in (("off", None), ("rollout", jnp.asarray(routes))):
        chosen, gap = forward(r)
        differ = np.any(np.sort(np.asarray(chosen), -1) != np.sort(routes, -1), -1) & recorded
        result[f"differ_{name}"] = int(differ.sum())
        result[f"gap_mean_{name}"] = float(gap.sum() / mask.sum())
        result[f"gap_max_{name}"] = float(gap.max())
    return result


def main() -> None:
    print(f"jax {jax.__version__} on {jax.default_backend()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| compute dtype | sampler selections | differ without replay | differ with replay | "
          "log-prob gap mean / max without | with replay |")
    print("|---|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        r = measure(dtype)
        print(f"| {r['dtype']} | {r['selections']} | {r['differ_off']} ({r['differ_off'] / r['selections']:.1%}) | "
              f"{r['differ_rollout']} | {r['gap_mean_off']:.4f} / {r['gap_max_off']:.3f} | "
              f"{r['gap_mean_rollout']:.4f} / {r['gap_max_rollout']:.3f} |")


if __name__ == "__main__":
    main()
