"""Command line: `r1jax summary|convert|demo` (training stages join as they land).

    r1jax summary configs/models/deepseek_v3.yaml --devices 256 mesh.expert=8
    r1jax convert hf-to-r1jax /ckpts/DeepSeek-V3 /ckpts/v3-r1jax mesh.fsdp=-1
    r1jax convert r1jax-to-hf /ckpts/v3-r1jax /ckpts/v3-hf --dtype bfloat16
    r1jax demo

Bad input (unknown key, missing file, checkpoint that does not fit) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from r1jax.config import Config, ConfigError, load_config, mesh_model_errors
from r1jax.errors import CheckpointError, DataError
from r1jax.train.loop import TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("deepseek_v3", "deepseek_v2_lite", "qwen2.5-1.5b", "qwen2.5-7b", "llama3.1-8b")


def _mesh_sizes(cfg: Config, devices: int) -> dict[str, int]:
    sizes = cfg.mesh.resolve(devices)
    for key, msg in mesh_model_errors(sizes, cfg.model):
        raise ConfigError(f"{key}: {msg}")
    return sizes


def cmd_summary(args) -> None:
    from r1jax.summary import summarize

    cfg = load_config(args.config, args.overrides)
    print(summarize(cfg, _mesh_sizes(cfg, args.devices), shapes=not args.brief))


def _local_mesh(cfg: Config):
    import jax

    from r1jax.sharding import make_mesh

    if len(jax.devices()) == 1:
        return None
    return make_mesh(cfg.mesh, model=cfg.model)


def cmd_convert(args) -> None:
    from r1jax.checkpoint import restore_params, save_params
    from r1jax.convert import load_hf, model_config_from_hf, save_hf
    from r1jax.convert.safetensors_io import Checkpoint

    t0 = time.time()
    if args.direction == "hf-to-r1jax":
        ckpt = Checkpoint(args.src)
        if args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            model = model_config_from_hf(ckpt.config, param_dtype=args.dtype, tensor_names=ckpt.names)
            cfg = load_config(data={"model": dataclasses.asdict(model)}, overrides=args.overrides)
        mesh = _local_mesh(cfg)
        model_cfg, _, state = load_hf(args.src, cfg.model, mesh)
        out = save_params(args.dst, model_cfg, state)
    else:
        model_cfg, _, state = restore_params(args.src)
        out = save_hf(state, model_cfg, args.dst, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"converted {args.src} -> {out} ({model_cfg.family}) in {time.time() - t0:.1f}s")


def cmd_demo(args) -> None:
    """The main job until the pipeline lands: preset summaries, then a tiny MoE on this machine."""
    import jax
    import numpy as np
    from flax import nnx

    from r1jax.convert import load_hf, save_hf
    from r1jax.models import forward, init_model
    from r1jax.summary import count_params, summarize

    print("== r1jax model presets (shapes only, nothing allocated) ==")
    for name in PRESETS:
        cfg = load_config(ROOT / "configs" / "models" / f"{name}.yaml")
        c = count_params(cfg.model)
        mtp = f"  (+{c.mtp / 1e9:.2f}B MTP)" if c.mtp else ""
        print(f"  {name:18s} {c.total / 1e9:8.2f}B total {c.active / 1e9:7.2f}B active per token{mtp}")
    v3 = load_config(ROOT / "configs" / "models" / "deepseek_v3.yaml")
    print()
    print(summarize(v3, {"data": 1, "fsdp": 32, "expert": 8, "tensor": 1}, shapes=False))
    print()
    cfg = load_config(ROOT / "configs" / "models" / "tiny_v3.yaml", args.overrides)
    m = cfg.model
    print(f"== tiny DeepSeek-V3 on {jax.devices()[0].platform} ==")
    print(summarize(cfg, {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, shapes=False))
    graphdef, state = init_model(m, jax.random.key(0))
    fwd = jax.jit(forward, static_argnums=0, static_argnames="with_mtp")
    tokens = jax.random.randint(jax.random.key(1), (8, 256), 1, m.vocab_size)
    logits, aux = fwd(graphdef, state, tokens, with_mtp=True)
    jax.block_until_ready(logits)
    t0, n = time.perf_counter(), 5
    for _ in range(n):
        logits, aux = fwd(graphdef, state, tokens, with_mtp=True)
    jax.block_until_ready(logits)
    dt = (time.perf_counter() - t0) / n
    load = np.asarray(aux["moe_load"])
    print(f"  forward [8 x 256] with MTP: {tokens.size / dt:,.0f} tokens/s; logits {tuple(logits.shape)}, "
          f"MTP logits {tuple(aux['mtp_logits'].shape)}")
    spread = ", ".join(f"{x:.2f}" for x in load.max(1) / load.mean(1))
    balance = ", ".join(f"{x:.3f}" for x in np.asarray(aux["balance_loss"]))
    print(f"  expert load max/mean per MoE layer: {spread}; sequence balance loss: {balance}")
    out = Path(args.workdir) / f"tiny_v3_hf_{int(time.time())}"
    save_hf(state, m, out)
    _, _, back = load_hf(out)
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(state)),
                                                     jax.tree.leaves(nnx.to_pure_dict(back))))
    print(f"  HF round trip via {out}: {'exact' if same else 'MISMATCH'}")
    if not same:
        raise SystemExit(1)



def cmd_sft(args) -> None:
    from r1jax.train.sft import run_sft

    cfg = load_config(args.config, args.overrides)
    out = run_sft(cfg)
    import jax

    if jax.process_index() == 0:
        last = out["last"]
        print(f"sft {cfg.name or args.config}: {out['how']} -> step {out['step']} ({out['stop']}); "
              f"loss {last.get('loss', float('nan')):.4f}")
        for ev in out["evals"]:
            if "accuracy" in ev:
                print(f"held-out exact match at step {ev['step']}: {ev['accuracy']:.1%} of {ev['n']}")
    if out["stop"] == "preempted":
        raise SystemExit(EXIT_PREEMPTED)


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early on request, a checkpoint holds the progress
EXIT_DIVERGED = 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="r1jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("summary", help="parameter counts, shapes and memory per device of a config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    s.add_argument("--devices", type=int, default=1, help="mesh size to report memory for (fills the -1 axis)")
    s.add_argument("--brief", action="store_true", help="omit the per-variable shape table")
    s.set_defaults(fn=cmd_summary)

    c = sub.add_parser("convert", help="HF safetensors <-> r1jax params checkpoint")
    c.add_argument("direction", choices=["hf-to-r1jax", "r1jax-to-hf"])
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides (hf-to-r1jax)")
    c.add_argument("--config", help="model config to load into (default: from the HF config.json)")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], help="parameter dtype to write")
    c.add_argument("--max-shard-gb", type=float, default=5.0)
    c.set_defaults(fn=cmd_convert)

    t = sub.add_parser("sft", help="supervised fine-tuning stage (resumes from checkpoint.dir)")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    t.set_defaults(fn=cmd_sft)

    d = sub.add_parser("demo", help="the main job: preset summaries and a tiny MoE on this machine")
    d.add_argument("overrides", nargs="*")
    d.add_argument("--workdir", default="runs")
    d.set_defaults(fn=cmd_demo)

    args, extra = p.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(getattr(args, "overrides", [])) + extra  # key=value anywhere on the line
    try:
        args.fn(args)
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


if __name__ == "__main__":
    sys.exit(main())
