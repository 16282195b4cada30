#!/usr/bin/env python3
"""Write the golden HF reference outputs under tests/golden/ (needs the `reference` extra).

For every tiny config in tests/hf_reference.py: a random HF transformers model saved with
`save_pretrained` (config.json + model.safetensors) and `io.npz` holding a batch of varied-length
inputs and the float32 logits transformers computes for it. The golden tests load the checkpoint
through r1jax.convert and compare; CI needs no torch.

    .venv/bin/python scripts/make_golden.py
"""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import hf_reference as R  # noqa: E402


def main() -> None:
    out_root = ROOT / "tests" / "golden"
    for i, name in enumerate(R.TINY):
        model = R.build_hf_model(name, seed=100 + i)
        out = out_root / name
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        ids, mask = R.sample_batch(model.config.vocab_size, seed=200 + i)
        logits = R.hf_logits(model, ids, mask)
        np.savez_compressed(out / "io.npz", input_ids=ids, attention_mask=mask, logits=logits)
        print(f"{name}: {sum(p.numel() for p in model.parameters())} params -> {out}")


if __name__ == "__main__":
    main()
