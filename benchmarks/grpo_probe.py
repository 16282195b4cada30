#!/usr/bin/env python3
"""Probe one GRPO rollout batch: how does an Adam step move the log-likelihood of the correct
rollouts, the incorrect ones in groups with a signal, and those with zero advantage?

    .venv/bin/python benchmarks/grpo_probe.py runs/sft-arithmetic-weak --lr 1e-5 --steps 10

Uses configs/grpo_arithmetic.yaml (G=16 x 8 prompts, T=0.6, top-p 0.95), one minibatch, no bias
updates and no balance loss, so only the policy gradient moves the params. Prints, per step, the
mean change of the summed response log-prob in each of the three sets.
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r1jax.config import load_config  # noqa: E402
from r1jax.data.pipeline import make_source  # noqa: E402
from r1jax.rewards import RewardFn  # noqa: E402
from r1jax.sampling import generate  # noqa: E402
from r1jax.stages.grpo import PromptStream  # noqa: E402
from r1jax.stages.start import start_stage  # noqa: E402
from r1jax.train import grpo as G  # noqa: E402
from r1jax.train.losses import group_advantages  # noqa: E402
from r1jax.train.state import make_context  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--advantages", choices=["all", "positive", "negative"], default="all",
                   help="keep only the positive or the negative advantages (which part moves what)")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    a = p.parse_args()
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "grpo_arithmetic.yaml", [
        f"checkpoint.init_from={a.checkpoint}", "checkpoint.dir=", f"optimizer.lr={a.lr}", "optimizer.warmup_steps=0",
        "train.bias_update_speed=0", "train.balance_loss_coef=0", "grpo.minibatches=1", *a.set])
    g, smp = cfg.grpo, cfg.sampling
    src = make_source(cfg.data, cfg.data.split)
    ctx = make_context(cfg, 100, loss=G.GRPOLoss.from_config(cfg))
    st = start_stage(cfg, src, ctx=ctx, wrap=G.grpo_wrap(0.0))
    tok, state = st.tokenizer, st.state
    batch = next(PromptStream(src, tok, cfg, 0))
    with jax.set_mesh(st.mesh):
        out = generate(ctx.graphdef, nnx.merge_state(state.params, state.router_bias), jnp.asarray(batch["tokens"]),
                       jnp.asarray(batch["lengths"]), jax.random.key(1), max_new_tokens=smp.max_new_tokens,
                       eos_id=tok.eos_id, temperature=smp.temperature, top_p=smp.top_p, vocab_limit=tok.vocab_size)
        toks, ends, starts = np.asarray(out["tokens"]), np.asarray(out["lengths"]), batch["lengths"]
        records = [r for r in batch["records"] for _ in range(g.group_size)]
        texts = [tok.decode(toks[i, starts[i]:ends[i]].tolist(), skip_special=True) for i in range(len(toks))]
        reward = RewardFn({"accuracy": 1.0}, inline=True)(texts, records)["total"]
        adv = np.asarray(group_advantages(jnp.asarray(reward), g.group_size))
        rows = G.rollout_batch(out["tokens"], jnp.asarray(starts), out["lengths"])
        keep = {"all": adv, "positive": np.maximum(adv, 0), "negative": np.minimum(adv, 0)}[a.advantages]
        rows["advantages"] = jnp.asarray(keep)
        rows["old_logp"] = G.token_logprobs(state.params, state.router_bias, rows, ctx=ctx)
        total = jax.jit(lambda lp: jnp.sum(lp * rows["response_mask"], 1))
        before = np.asarray(total(rows["old_logp"]))
        print(f"{int(reward.sum())} of {len(reward)} rollouts correct")
        ts = state.train_state()
        step = jax.jit(lambda s, b: G.grpo_step(s, b, None, ctx=ctx))
        for k in range(a.steps):
            ts, _ = step(ts, rows)
            d = np.asarray(total(G.token_logprobs(ts.params, ts.router_bias, rows, ctx=ctx))) - before
            print(f"step {k + 1}: d log p  correct {d[reward > 0].mean():+.3f}  incorrect (signal groups) "
                  f"{d[(reward == 0) & (adv != 0)].mean():+.3f}  zero advantage {d[adv == 0].mean():+.3f}")


if __name__ == "__main__":
    main()
