#!/usr/bin/env python3
"""Write the golden HF reference outputs under tests/golden/ (needs the `reference` extra).

For every tiny config in tests/hf_reference.py:
  - a random HF transformers model saved with `save_pretrained` (config.json + model.safetensors)
    and `io.npz` holding a batch of varied-length inputs and the float32 logits transformers
    computes for it. Written only when the checkpoint is missing, or with --force;
  - `generate.npz`: three prompts of different lengths and the greedy continuations of HF
    `generate` (no eos), computed from the checkpoint already saved in tests/golden/<name>
    (loaded with from_pretrained, so the checkpoint and io.npz stay as they are).

The golden tests load the checkpoint through r1jax.convert and compare; CI needs no torch.

    .venv/bin/python scripts/make_golden.py [--force]
"""

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import hf_reference as R  # noqa: E402


def write_checkpoint(name: str, index: int, out: Path) -> None:
    """config.json + model.safetensors of a fresh random model, and io.npz with its logits."""
    model = R.build_hf_model(name, seed=100 + index)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    ids, mask = R.sample_batch(model.config.vocab_size, seed=200 + index)
    logits = R.hf_logits(model, ids, mask)
    np.savez_compressed(out / "io.npz", input_ids=ids, attention_mask=mask, logits=logits)
    print(f"{name}: {sum(p.numel() for p in model.parameters())} params -> {out}")


def write_generate(name: str, index: int, out: Path) -> None:
    """generate.npz: prompts [3, max_len] (right-padded with 0), lengths [3], the HF greedy
    continuations [3, GEN_NEW] with their top-1/top-2 logit gaps, and the prompt seed (the first
    whose greedy paths have no near-tie)."""
    model = R.load_hf_model(out)
    seed, prompts, tokens, margins = R.decisive_prompts(model, seed=300 + 100 * index)
    lengths = np.array([len(p) for p in prompts], np.int32)
    buf = np.zeros((len(prompts), lengths.max()), np.int32)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    np.savez_compressed(out / "generate.npz", prompts=buf, lengths=lengths, tokens=np.array(tokens, np.int32),
                        margins=np.array(margins, np.float32), seed=np.int64(seed))
    print(f"{name}: greedy continuations of prompt seed {seed} (min logit gap {np.min(margins):.1e}) "
          f"-> {out / 'generate.npz'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--force", action="store_true", help="rebuild checkpoints and io.npz even where present")
    args = p.parse_args()
    for i, name in enumerate(R.TINY):
        out = ROOT / "tests" / "golden" / name
        if args.force or not (out / "model.safetensors").exists():
            write_checkpoint(name, i, out)
        write_generate(name, i, out)


if __name__ == "__main__":
    main()
