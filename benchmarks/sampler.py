#!/usr/bin/env python3
"""Decode throughput of r1jax `generate` next to HF transformers `generate`, same weights, same run.

    .venv/bin/python benchmarks/sampler.py [--models qwen2 deepseek_v3] [--batch 1 16] [--prompt 64]
        [--new 128] [--d-model 384] [--layers 6] [--vocab 32000] [--reps 3] [--torch-threads 0]
        [--hbm-gbps 4800]

For each model a random HF model is built, saved with `save_pretrained` and loaded by
r1jax.convert, so both frameworks run the same float32 weights. Per batch size, both generate
greedily (no eos: every row runs to --new) after a warm-up call (r1jax compiles there). Times are
medians of --reps, the two frameworks taking turns: `prefill` is generate with 1 new token (r1jax:
a buffer of prompt + 1 positions, so both prefill exactly the prompt), and decode tokens/s is
batch * (new - 1) / (time(new) - time(1)). The first --check tokens of every row are compared as
a sanity check. On a GPU the decode rate is also given as a fraction of the HBM-bandwidth bound
(parameters read once per step + the KV cache at the mean context length, / --hbm-gbps). Needs the
`bench` extra (`pip install -e .[bench]`; torch + transformers). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.convert import load_hf
from r1jax.sampling import generate


def hf_model(kind: str, d: int, layers: int, vocab: int, init_std: float, seed: int = 0):
    """A random float32 HF model: a Qwen2.5-style GQA one or a DeepSeek-V3-style MLA + MoE one."""
    import torch
    import transformers

    heads = d // 64
    common = dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                  max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common, intermediate_size=int(d * 11 / 3) // 32 * 32,
                                          num_key_value_heads=max(1, heads // 3), use_sliding_window=False,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        cls = transformers.Qwen2ForCausalLM
    elif kind == "deepseek_v3":
        config = transformers.DeepseekV3Config(
            **common, num_key_value_heads=heads, intermediate_size=4 * d, moe_intermediate_size=d // 2,
            q_lora_rank=d // 2, kv_lora_rank=d // 3 // 32 * 32 or 32, qk_nope_head_dim=64, qk_rope_head_dim=32,
            v_head_dim=64, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
            first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4})
        cls = transformers.DeepseekV3ForCausalLM
    else:
        raise ValueError(f"--models: unknown {kind!r} (qwen2, deepseek_v3)")
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    with torch.no_grad():  # decisive predictions: norms around 1, weights wider than HF's init
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(init_std * torch.randn_like(p))
    return model


def timed(runs: dict, lengths: tuple[int, ...], reps: int) -> tuple[dict, dict]:
    """Median seconds of every run(k) for k in lengths, {(name, k): s}, and the last tokens of each
    run at the longest length. The runs take turns, so a change in machine load hits them alike."""
    times = {(name, k): [] for name in runs for k in lengths}
    tokens = {}
    for _ in range(reps):
        for k in lengths:
            for name, run in runs.items():
                t0 = time.perf_counter()
                out = run(k)
                times[name, k].append(time.perf_counter() - t0)
                if k == max(lengths):
                    tokens[name] = out
    return {key: statistics.median(v) for key, v in times.items()}, tokens


def r1jax_runner(graphdef, state, prompts: np.ndarray):
    """fn(k) -> new tokens [B, k] of r1jax greedy generate in a buffer of prompt + k positions, so
    that its prefill covers the prompt only (`generate` prefills the first T - k positions), as HF's."""
    b, p = prompts.shape
    lens = np.full((b,), p, np.int32)

    def run(k):
        buf = np.zeros((b, p + k), np.int32)
        buf[:, :p] = prompts
        out = generate(graphdef, state, buf, lens, jax.random.key(0), max_new_tokens=k, eos_id=-1)
        return np.asarray(jax.block_until_ready(out["tokens"]))[:, p:p + k]

    return run


def hf_runner(model, prompts: np.ndarray):
    """fn(k) -> new tokens [B, k] of HF greedy generate (equal-length prompts: no padding)."""
    import torch
    import transformers

    ids = torch.from_numpy(prompts.astype(np.int64)).to(model.device)

    def run(k):
        gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=k, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        if out.is_cuda:
            torch.cuda.synchronize()
        return out[:, prompts.shape[1]:].cpu().numpy()

    return run


def decode_bytes_per_step(cfg: ModelConfig, state: nnx.State, batch: int, context: float) -> float:
    """HBM bytes one decode step must read at least: every parameter once (the embedding table only
    for the rows looked up, unless tied to the head; routed experts only in the expected fraction
    touched by batch * k uniformly routed choices; MTP not at all) plus the KV cache of `batch`
    rows at `context` tokens (MLA: the compressed c_kv + k_rope; GQA: K and V)."""
    itemsize = np.dtype(cfg.dtype).itemsize
    touched = 1.0
    if cfg.is_moe:
        touched = 1.0 - (1.0 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** batch
    total = 0.0
    for path, var in nnx.to_flat_state(state):
        arr = var.get_value()
        size = arr.size * arr.dtype.itemsize
        if path[0] == "mtp":
            continue
        if path == ("embed",) and not cfg.tie_embeddings:
            size = batch * cfg.d_model * arr.dtype.itemsize
        elif path[0] == "moe_blocks" and path[-1] in ("w_gate", "w_up", "w_down") and "shared" not in path:
            size *= touched
        total += size
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) if cfg.is_mla else 2 * cfg.kv_heads * cfg.gqa_head_dim
    return total + cfg.n_layers * batch * context * per_token * itemsize


def bench(kind: str, args, tmp: str) -> list[dict]:
    import torch

    model = hf_model(kind, args.d_model, args.layers, args.vocab, args.init_std)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp)
    cfg, graphdef, state = load_hf(tmp)
    if torch.cuda.is_available():
        model = model.to("cuda")
    rows = []
    for b in args.batch:
        prompts = np.random.default_rng(b).integers(1, args.vocab, (b, args.prompt)).astype(np.int32)
        runs = {"r1jax": r1jax_runner(graphdef, state, prompts), "hf": hf_runner(model, prompts)}
        for run in runs.values():
            run(1), run(args.new)  # warm-up (compilation for r1jax)
        med, toks = timed(runs, (1, args.new), args.reps)
        res = {name: dict(prefill=med[name, 1], decode=b * (args.new - 1) / (med[name, args.new] - med[name, 1]),
                          tokens=toks[name]) for name in runs}
        agree = (res["r1jax"]["tokens"][:, :args.check] == res["hf"]["tokens"][:, :args.check]).all(1)
        row = dict(model=f"{kind} ({n_params / 1e6:.1f}M)", batch=b, res=res, agree=f"{agree.sum()}/{b}")
        if jax.devices()[0].platform == "gpu":
            step_bytes = decode_bytes_per_step(cfg, state, b, args.prompt + args.new / 2)
            bound = b / (step_bytes / (args.hbm_gbps * 1e9))
            row["bw"] = res["r1jax"]["decode"] / bound
        rows.append(row)
        print(f"  {row['model']} batch {b}: r1jax {res['r1jax']['decode']:,.0f} tok/s, "
              f"HF {res['hf']['decode']:,.0f} tok/s, first {args.check} tokens agree on {row['agree']} rows",
              flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description="r1jax generate vs HF transformers generate, decode tokens/s")
    p.add_argument("--models", nargs="+", default=["qwen2", "deepseek_v3"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--init-std", type=float, default=0.05)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--check", type=int, default=8, help="leading tokens compared between the two")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--hbm-gbps", type=float, default=4800.0, help="HBM bandwidth for the GPU bound (H200: 4800)")
    args = p.parse_args()

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}) x{len(jax.devices())}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; prompt {args.prompt}, {args.new} new tokens, "
          f"median of {args.reps}", flush=True)
    rows = []
    for kind in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench(kind, args, tmp)
    gpu = "bw" in rows[0]
    print("\n| model | batch | r1jax prefill (+1 token) | HF prefill (+1 token) | r1jax decode tok/s | "
          "HF decode tok/s | r1jax / HF | greedy: first %d tokens agree |%s" % (args.check, " r1jax / HBM bound |" if gpu else ""))
    print("|---|---|---|---|---|---|---|---|%s" % ("---|" if gpu else ""))
    for r in rows:
        j, h = r["res"]["r1jax"], r["res"]["hf"]
        print(f"| {r['model']} | {r['batch']} | {j['prefill'] * 1e3:.1f} ms | {h['prefill'] * 1e3:.1f} ms | "
              f"{j['decode']:,.0f} | {h['decode']:,.0f} | {j['decode'] / h['decode']:.2f}x | {r['agree']} rows |"
              + (f" {r['bw']:.1%} |" if gpu else ""))


if __name__ == "__main__":
    main()
