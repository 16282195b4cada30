"""Helper of tests/test_grpo_runs.py::test_two_processes_score_their_own_rows (not a test).

    python tests/grpo_process_run.py OUT_DIR MODEL OVERRIDE...

One GRPO run on a tiny model (configs/models/MODEL.yaml; this process's part of a multi-process
job, or all of it) with a digit-share reward. Writes OUT_DIR/p<process>.json: how many rows this
process scored per iteration, and the advantages each iteration trained on."""

import json
import sys
from pathlib import Path

import jax
import numpy as np

from r1jax.config import load_config
from r1jax.stages import grpo as stage

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run(out: Path, model: str, overrides: list[str]) -> None:
    """The run; also called in-process by the test (the class patch is undone at the end)."""
    cfg = load_config(CONFIGS / "models" / f"{model}.yaml", overrides)
    log = {"scored": [], "advantages": []}

    def digit_share(texts, records):
        log["scored"].append(len(texts))
        r = np.array([sum(c.isdigit() for c in t) / max(len(t), 1) for t in texts], np.float32)
        return {"total": r, "digits": r}

    original = stage.GRPOIteration.advantages_and_masks

    def recorded(self, rollout, scores):
        rows, weights = original(self, rollout, scores)
        log["advantages"].append(np.asarray(weights["advantages"], np.float64).tolist())
        return rows, weights

    stage.GRPOIteration.advantages_and_masks = recorded
    try:
        stage.run_grpo(cfg, reward_fn=digit_share)
    finally:
        stage.GRPOIteration.advantages_and_masks = original
    out.mkdir(parents=True, exist_ok=True)
    (out / f"p{jax.process_index()}.json").write_text(json.dumps(log))


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
