"""Command line: `r1jax summary|convert|sft|grpo|rejection|distill|eval|pipeline|sample`.

    r1jax summary configs/models/deepseek_v3.yaml --devices 256 mesh.expert=8
    r1jax convert hf-to-r1jax /ckpts/DeepSeek-V3 /ckpts/v3-r1jax mesh.fsdp=-1
    r1jax convert r1jax-to-hf /ckpts/v3-r1jax /ckpts/v3-hf --dtype bfloat16
    r1jax sft configs/sft_arithmetic.yaml
    r1jax grpo configs/grpo_arithmetic.yaml
    r1jax sample runs/grpo-arithmetic --prompt "What is 347 + 589?" --num-samples 4
    r1jax pipeline configs/tiny_r1/pipeline.yaml          # the main job (python3 dev.py run)

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
from r1jax.rewards.code import SandboxUnavailable
from r1jax.stages.loop import TrainingDiverged


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
        model_cfg, _, state = load_hf(args.src, cfg.model, mesh, progress=True)
        out = save_params(args.dst, model_cfg, state)
    else:
        model_cfg, _, state = restore_params(args.src)
        out = save_hf(state, model_cfg, args.dst, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30),
                      progress=True)
    print(f"converted {args.src} -> {out} ({model_cfg.family}) in {time.time() - t0:.1f}s")


def cmd_stage(args) -> None:
    """`r1jax <kind> CONFIG`: run one stage of the registry's `kind` (r1jax.stages.registry), print
    its result (process 0), and exit 75 if it was preempted."""
    import jax

    from r1jax.stages.registry import STAGES

    kind = STAGES[args.kind]
    cfg = load_config(args.config, args.overrides)
    result = kind.run(cfg)
    if jax.process_index() == 0:
        for line in kind.lines(result, cfg.name or args.config):
            print(line)
    if result.stop == "preempted":
        raise SystemExit(EXIT_PREEMPTED)


def cmd_dry_run(args) -> None:
    """--dry-run of a stage config, or of every stage of a pipeline file."""
    from r1jax.dryrun import dry_run

    if args.kind == "pipeline":
        from r1jax.pipeline import load_pipeline, stage_config

        pipe = load_pipeline(args.config, args.overrides)
        for spec in pipe.stages:
            try:
                report = dry_run(stage_config(pipe, spec), spec.kind, devices=args.devices, hbm_gib=args.hbm_gib)
            except ConfigError as e:
                raise ConfigError(f"{spec.config} (stage {spec.name}): {e}") from None
            print(f"== stage {spec.name} ({spec.kind}, {spec.config.name})\n{report}\n")
        return
    cfg = load_config(args.config, args.overrides)
    try:
        print(dry_run(cfg, args.kind, devices=args.devices, hbm_gib=args.hbm_gib))
    except ConfigError as e:
        raise ConfigError(f"{args.config}: {e}") from None


def cmd_pipeline(args) -> None:
    import jax

    from r1jax.pipeline import heldout_accuracy, run_pipeline

    out = run_pipeline(args.config, args.overrides)
    if jax.process_index() == 0:
        for name, s in out["stages"].items():
            acc = heldout_accuracy(s)
            print(f"{name} ({s['kind']}): held-out accuracy {'-' if acc is None else f'{acc:.1%}'}")
        print(f"report: {out['dir'] / 'report.md'}")
    if out["stopped"]:
        raise SystemExit(EXIT_PREEMPTED)


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += _prompts_file(Path(args.prompts))
    if not prompts:
        raise ConfigError("sample: give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def _prompts_file(f: Path) -> list[str]:
    """One question per line, or per JSON line (a 'question' or 'prompt' field) in a .jsonl file; each
    line is read in bounded pieces and must be UTF-8 text without lone surrogates."""
    import json

    from r1jax.config import MAX_RECORD_BYTES
    from r1jax.data.sources import lone_surrogate, read_lines

    if not f.is_file():
        raise DataError(f"{f}: {'is a directory, not' if f.is_dir() else 'no such'} prompts file")
    prompts = []
    try:
        with open(f, "rb") as fh:
            for n, _, _, size, raw in read_lines(fh, MAX_RECORD_BYTES):
                if raw is None:
                    raise DataError(f"{f}:{n}: line of {size} bytes exceeds the {MAX_RECORD_BYTES}-byte limit of a prompt")
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise DataError(f"{f}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
                if not line.strip():
                    continue
                if f.suffix == ".jsonl":
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{f}:{n}: not JSON ({e.msg})") from None
                    line = obj.get("question", obj.get("prompt")) if isinstance(obj, dict) else None
                    if not isinstance(line, str):
                        raise DataError(f"{f}:{n}: needs a string field 'question' or 'prompt'")
                bad = lone_surrogate(line, "question")
                if bad:
                    raise DataError(f"{f}:{n}: {bad}: not valid Unicode text")
                prompts.append(line)
    except OSError as e:
        raise DataError(f"{f}: cannot read ({e.strerror or e})") from None
    return prompts


def cmd_sample(args) -> None:
    """Sample completions from any stage checkpoint; one JSON line per sample on stdout."""
    import json

    import jax
    import numpy as np

    from r1jax.sampling import generate, pad_prompts
    from r1jax.stages.start import load_policy
    from r1jax.tokenizer import encode_prompt

    for flag, value in (("--num-samples", args.num_samples), ("--max-new-tokens", args.max_new_tokens)):
        if value <= 0:
            raise ConfigError(f"sample: {flag} must be > 0, got {value}")
    prompts = _read_prompts(args)
    policy = load_policy(args.checkpoint, args.overrides)
    tok = policy.tokenizer
    if tok is None:
        raise CheckpointError(f"{args.checkpoint}: carries no tokenizer; pass tokenizer.path=DIR")
    template = args.template or policy.cfg.data.template
    ids = [np.asarray(tok.encode(p, add_bos=True), np.int32) if template == "none" else encode_prompt(tok, template, p)
           for p in prompts]
    rows = [i for i in ids for _ in range(args.num_samples)]  # generate's output rows: each prompt's samples together
    total = max(len(r) for r in rows) + args.max_new_tokens
    if total > policy.cfg.model.max_seq_len:
        raise ConfigError(f"sample: the longest prompt ({max(len(r) for r in rows)} tokens) + --max-new-tokens "
                          f"{args.max_new_tokens} = {total} exceeds model.max_seq_len={policy.cfg.model.max_seq_len}")
    tokens, lengths = pad_prompts(ids, total, tok.pad_id)  # each prompt once: prefilled once for its samples
    with jax.set_mesh(policy.mesh):
        out = generate(policy.graphdef, policy.state, tokens, lengths, jax.random.key(args.seed),
                       max_new_tokens=args.max_new_tokens, eos_id=tok.eos_id, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, vocab_limit=tok.vocab_size,
                       samples_per_prompt=args.num_samples)
    toks, lens, logps = (np.asarray(jax.device_get(out[k])) for k in ("tokens", "lengths", "logprobs"))
    for i, row in enumerate(rows):
        new = toks[i, len(row):lens[i]].tolist()
        print(json.dumps({"prompt": prompts[i // args.num_samples], "sample": i % args.num_samples,
                          "completion": tok.decode(new, skip_special=True), "tokens": len(new),
                          "logprob": float(logps[i, :len(new)].sum())}), flush=True)


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

    from r1jax.stages.registry import STAGES

    commands = [(k.name, cmd_stage, k.help) for k in STAGES.values()]
    for name, fn, text in (*commands,
                           ("pipeline", cmd_pipeline, "a whole pipeline file: stages in order, finished ones skipped")):
        q = sub.add_parser(name, help=text)
        q.add_argument("config")
        q.add_argument("overrides", nargs="*", help="dotted key=value overrides"
                       + (" (<stage>.<key>=value, dir=...)" if name == "pipeline" else ""))
        q.add_argument("--dry-run", action="store_true",
                       help="validate the config and print memory per device on its mesh; allocate nothing")
        q.add_argument("--devices", type=int, help="--dry-run: device count for a mesh axis of -1")
        q.add_argument("--hbm-gib", type=float, help="--dry-run: device memory to check the plan against")
        q.set_defaults(fn=fn, kind=name)

    sm = sub.add_parser("sample", help="sample completions from a stage or params checkpoint (JSON lines)")
    sm.add_argument("checkpoint", help="a run directory (its latest step) or a params checkpoint")
    sm.add_argument("overrides", nargs="*", help="dotted key=value overrides (mesh.*, tokenizer.path)")
    sm.add_argument("--prompt", action="append", help="a question (repeatable)")
    sm.add_argument("--prompts", help="a file: one question per line, or .jsonl with 'question'/'prompt'")
    sm.add_argument("--template", help="chat template (default: the checkpoint's data.template); 'none': raw text")
    sm.add_argument("--num-samples", type=int, default=1)
    sm.add_argument("--max-new-tokens", type=int, default=256)
    sm.add_argument("--temperature", type=float, default=0.6, help="0: greedy (the R1 paper evaluates at 0.6)")
    sm.add_argument("--top-p", type=float, default=0.95)
    sm.add_argument("--top-k", type=int, default=0)
    sm.add_argument("--seed", type=int, default=0)
    sm.set_defaults(fn=cmd_sample)

    args, extra = p.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(getattr(args, "overrides", [])) + extra  # key=value anywhere on the line
    try:
        if getattr(args, "dry_run", False):
            cmd_dry_run(args)
        else:
            args.fn(args)
    except (ConfigError, CheckpointError, DataError) as e:
        msg = str(e)
        if isinstance(e, ConfigError) and msg.startswith("command line") and getattr(args, "config", None):
            msg = f"{args.config}: {msg}"  # an override that does not fit this config file
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except SandboxUnavailable as e:  # code rewards on a host that cannot wall the code off
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
