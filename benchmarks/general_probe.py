#!/usr/bin/env python3
"""Probe what GRPO's general rows carry: sample group_size responses of general prompts from a
policy, score them with a reward model as a GRPO iteration does (`GRPOIteration.rollout` and
`.score`), and compare with the task's hidden preference (`procedural.parity_preference`).

    .venv/bin/python benchmarks/general_probe.py RUN/cold_start RUN/reward_model --seed 2

Prints a few groups (each distinct response with its count, reward-model score and hidden
preference), how often the summaries state a parity per last digit, the Spearman correlation
of the scores with the preference, and their mean correlation within the groups where the
preference varies (what group advantages follow). Uses configs/tiny_r1/all_scenarios.yaml with
every prompt a general one.
"""

import argparse
import collections
import re
import sys
from pathlib import Path

import jax
import numpy as np
from scipy.stats import spearmanr  # tied ranks averaged: the preference is 0 / 1

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r1jax.config import load_config  # noqa: E402
from r1jax.data.pipeline import make_source  # noqa: E402
from r1jax.data.procedural import parity_preference  # noqa: E402
from r1jax.stages.grpo import GRPOIteration, PromptStream, make_reward_fn  # noqa: E402
from r1jax.stages.start import start_stage  # noqa: E402
from r1jax.train import grpo as G  # noqa: E402
from r1jax.train.state import make_context  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("policy")
    p.add_argument("reward_model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, default=2, help="iterations' worth of prompts (16 prompts each)")
    p.add_argument("--show", type=int, default=4, help="groups to print")
    a = p.parse_args()
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "tiny_r1" / "all_scenarios.yaml", [
        f"checkpoint.init_from={a.policy}", "checkpoint.dir=", f"grpo.reward_model={a.reward_model}",
        "data.general_share=1.0", f"data.seed={a.seed}", f"train.seed={a.seed}", "grpo.prompts_per_step=16"])
    src = make_source(cfg.data, cfg.data.split)
    ctx = make_context(cfg, 100, loss=G.GRPOLoss.from_config(cfg))
    st = start_stage(cfg, src, ctx=ctx, wrap=G.grpo_wrap(0.0))
    reward_fn = make_reward_fn(cfg)
    it = GRPOIteration(cfg, ctx, st.mesh, st.tokenizer, reward_fn)
    prompts = PromptStream(src, st.tokenizer, cfg, start=0)
    g = cfg.grpo.group_size
    scores, prefs, within, counts = [], [], [], collections.Counter()
    for k in range(a.batches):
        batch = next(prompts)
        with jax.set_mesh(st.mesh):
            ro = it.rollout(st.state, batch, jax.random.key(k))
            sc = it.score(ro)
        rm = sc.components["reward_model"]
        pref = np.asarray([parity_preference(r["number"], t) for r, t in zip(ro.records, ro.texts)])
        scores += list(rm)
        prefs += list(pref)
        for r, t in zip(ro.records, ro.texts):
            summary = t.rsplit("</think>", 1)[-1]
            stated = re.findall(r"\b(odd|even)\b", summary)
            counts[f"last digit {r['number'] % 10}: " + (stated[0] if stated else "none")] += 1
        for lab, s in zip(pref.reshape(-1, g), rm.reshape(-1, g)):
            if lab.min() != lab.max():
                within.append(np.corrcoef(lab, s)[0, 1])
        for gi in range(a.show if k == 0 else 0):
            print(ro.records[gi * g]["question"])
            seen = collections.OrderedDict()
            for i in range(gi * g, (gi + 1) * g):
                n, s0, l0 = seen.get(ro.texts[i], (0, rm[i], pref[i]))
                seen[ro.texts[i]] = (n + 1, s0, l0)
            for text, (n, s0, l0) in seen.items():
                print(f"  {n:2d}x  score {s0:7.3f}  preference {l0:.0f}  {text}")
    reward_fn.close()
    scores, prefs = np.asarray(scores), np.asarray(prefs)
    print("summaries by last digit:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"rows {len(prefs)}, hidden preference met {prefs.mean():.3f}")
    print(f"Spearman(score, preference) {spearmanr(scores, prefs).statistic:.3f}")
    print(f"within-group correlation, {len(within)} groups whose preference varies: "
          f"{np.mean(within) if within else float('nan'):.3f}")


if __name__ == "__main__":
    main()
