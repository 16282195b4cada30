#!/usr/bin/env python3
"""One GRPO iteration of r1jax next to TRL's `GRPOTrainer`, same tiny Qwen2 weights, same run.

    /tmp/bvenv/bin/python benchmarks/grpo_trl.py [--prompts 8] [--group 8] [--prompt-len 16] [--new 64]
        [--d-model 256] [--layers 4] [--vocab 1024] [--reps 5] [--grad-accum 1] [--beta 0]
        [--lr 1e-6] [--torch-threads 0]

A random HF Qwen2ForCausalLM (benchmarks/sampler.py's `hf_model`) is saved with `save_pretrained`
and loaded by `r1jax.convert.load_hf`, so both frameworks start from the same float32 weights. Both
then run the same GRPO iteration: --prompts fixed prompts of --prompt-len random token ids, --group
samples of each at temperature 1 (no top-k / top-p), --new new tokens, the reward `even_share`
(the fraction of even ids among the generated tokens: a deterministic function of the ids with
variance inside every group), group advantages (r - mean) / std, the token-mean clipped surrogate
(clip 0.2, TRL's `loss_type="dapo"` = r1jax's `aggregation: token-mean`), KL coefficient --beta,
one AdamW step (lr --lr constant, betas 0.9 / 0.999, no weight decay, global-norm clip 1).

The last id of the vocabulary is the end-of-sequence id, and neither side may sample it (r1jax:
`vocab_limit`; TRL: `suppress_tokens`), so every completion runs to --new tokens on both sides and
each iteration does the same sampling work.

- r1jax: `r1jax.stages.grpo.GRPOIteration` (what `r1jax grpo` runs each iteration: in-graph
  rollout, host scoring, advantages, the pi_old log-prob pass, the update), one minibatch, one
  inner epoch, train.grad_accum --grad-accum. Each of the iteration's parts (`rollout`, `score`,
  `advantages_and_masks`, `logprob_passes`, `updates`) is timed by wrapping the bound method; the
  log-prob pass is waited for (`block_until_ready`) so that its time is not charged to the updates.
- TRL: `GRPOTrainer` on torch CPU, float32 (bf16 / fp16 off), no vLLM, gradient checkpointing off
  (TRL's default is on), num_iterations 1, per_device_train_batch_size = prompts x group /
  --grad-accum and gradient_accumulation_steps --grad-accum, so steps_per_generation = grad_accum
  and one optimizer step consumes exactly one generation batch of prompts x group completions.
  Its time per iteration is on_step_begin -> on_step_end of a TrainerCallback (generation,
  scoring, loss, backward and the optimizer step; the trainer's logging afterwards is outside);
  its parts are the times inside `_generate_single_turn` (generation), `_calculate_rewards` and
  `_generate_and_score_completions` (generation, rewards, advantages), timed by wrapping the bound
  methods; the rest of the step is the loss forward, backward and the optimizer step.

Work that differs by design: with num_iterations 1 TRL skips the pi_old forward pass (the ratio is
1 by construction), while r1jax runs it (it also reports the sampler/trainer log-prob mismatch).

The two take turns: the callback runs one r1jax iteration after each TRL optimizer step, outside
TRL's timed window. The first iteration of each is a warm-up (r1jax compiles there) and is
dropped; times are medians of the --reps that follow. tokens/s = generated tokens / iteration
time. Needs the `bench` extra (`pip install -e .[bench]`: torch, transformers, trl, accelerate,
datasets). Prints markdown tables (whole iteration, then per part) with the command, versions and
machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sampler import hf_model  # noqa: E402  (benchmarks/sampler.py: the random HF model)

from r1jax.config import Config, GRPOConfig, MeshConfig, OptimizerConfig, SamplingConfig, TrainConfig  # noqa: E402
from r1jax.convert import load_hf  # noqa: E402
from r1jax.sampling import pad_prompts  # noqa: E402
from r1jax.sharding import make_mesh  # noqa: E402
from r1jax.stages.grpo import GRPOIteration  # noqa: E402
from r1jax.train.grpo import GRPOLoss, grpo_wrap  # noqa: E402
from r1jax.train.state import make_context, split_model, state_from_params  # noqa: E402


def even_share(ids) -> float:
    """The reward of one completion (token ids): the fraction of even ids, 0 for an empty one."""
    ids = list(ids)
    return sum(1 for i in ids if i % 2 == 0) / len(ids) if ids else 0.0


def fixed_prompts(n: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """[n, length] int32 prompt ids in [0, vocab - 1): the last id is the (never sampled) eos."""
    return np.random.default_rng(seed).integers(0, vocab - 1, (n, length)).astype(np.int32)


# --------------------------------------------------------------------------------------------------
# r1jax side
# --------------------------------------------------------------------------------------------------


class IdTokenizer:
    """What GRPOIteration asks of a tokenizer, over bare ids: decode writes the ids as decimal
    words, so the reward reads back exactly the generated ids. Ids >= vocab_size are never
    sampled (`generate`'s vocab_limit); eos and pad are the id vocab_size."""

    def __init__(self, model_vocab: int):
        self.vocab_size = model_vocab - 1
        self.eos_id = self.pad_id = model_vocab - 1

    def decode(self, ids, *, skip_special: bool = False) -> str:
        return " ".join(str(i) for i in ids if not (skip_special and i == self.eos_id))


def r1jax_reward(texts: list[str], records: list[dict]) -> dict:
    """GRPOIteration's reward_fn: even_share of each completion's ids (read back from the text)."""
    total = np.asarray([even_share(int(w) for w in t.split()) for t in texts], np.float32)
    return {"total": total, "even_share": total}


def r1jax_setup(hf_dir: str, args) -> tuple[GRPOIteration, object, dict, object]:
    """(iteration, initial GRPOState, prompt batch, mesh) for the HF checkpoint in hf_dir."""
    mcfg, graphdef, state = load_hf(hf_dir)
    mcfg = dataclasses.replace(mcfg, param_dtype="float32", dtype="float32")
    n_rows, total = args.prompts * args.group, args.prompt_len + args.new
    cfg = Config(
        model=mcfg, mesh=MeshConfig(),
        train=TrainConfig(steps=args.reps + 1, batch_size=n_rows, seq_len=total, grad_accum=args.grad_accum,
                          balance_loss_coef=0.0, bias_update_speed=0.0, mtp=False),
        optimizer=OptimizerConfig(lr=args.lr, schedule="constant", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                  grad_clip=1.0),
        grpo=GRPOConfig(group_size=args.group, prompts_per_step=args.prompts, clip_low=0.2, clip_high=0.2,
                        beta=args.beta, aggregation="token-mean", inner_epochs=1, minibatches=1),
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.new))
    ctx = make_context(cfg, loss=GRPOLoss.from_config(cfg))
    mesh = make_mesh(cfg.mesh, model=mcfg)
    _, params, bias = split_model(nnx.merge(graphdef, state))
    ts = state_from_params(ctx, params, bias, mesh)
    grpo_state = grpo_wrap(args.beta)(ts, lambda tree: jax.tree.map(lambda x: x.copy(), tree))
    tok = IdTokenizer(mcfg.vocab_size)
    prompts = fixed_prompts(args.prompts, args.prompt_len, mcfg.vocab_size)
    # PromptStream's layout: each prompt once, right-padded to seq_len (the rollout samples each G times).
    tokens, lengths = pad_prompts(list(prompts), total, tok.pad_id)
    batch = {"records": [{"id": f"p{i}"} for i in range(args.prompts)], "tokens": tokens, "lengths": lengths}
    return GRPOIteration(cfg, ctx, mesh, tok, r1jax_reward), grpo_state, batch, mesh


# --------------------------------------------------------------------------------------------------
# TRL side
# --------------------------------------------------------------------------------------------------


def id_tokenizer_hf(vocab: int):
    """An HF fast tokenizer over bare ids: the word "17" is id 17, words split on whitespace, no
    special tokens added; "<eos>" is the last id (also pad and unk)."""
    import tokenizers
    import transformers

    words = {str(i): i for i in range(vocab - 1)}
    words["<eos>"] = vocab - 1
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<eos>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>",
                                                unk_token="<eos>", padding_side="left")


def trl_reward_fn(group: int, log: list):
    """TRL's reward function: even_share of each completion's ids (groups contiguous, as TRL's
    RepeatSampler lays them out); appends the mean in-group std of each call to `log`."""

    def even_share_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
        rewards = [even_share(ids) for ids in completion_ids]
        log.append(float(np.asarray(rewards).reshape(-1, group).std(1).mean()))
        return rewards

    return even_share_reward


def trl_trainer(model, args, out_dir: str, callback, reward_log: list):
    """A GRPOTrainer over the fixed prompts, configured as the module docstring says."""
    import datasets
    import trl

    vocab = model.config.vocab_size
    tok = id_tokenizer_hf(vocab)
    prompts = fixed_prompts(args.prompts, args.prompt_len, vocab)
    data = datasets.Dataset.from_dict({"prompt": [" ".join(map(str, p)) for p in prompts]})
    conf = trl.GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=args.prompts * args.group // args.grad_accum,
        gradient_accumulation_steps=args.grad_accum, num_generations=args.group, num_iterations=1,
        max_completion_length=args.new, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"suppress_tokens": [vocab - 1]}, beta=args.beta, epsilon=0.2, loss_type="dapo",
        scale_rewards="group", learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=args.reps + 1, shuffle_dataset=False, logging_steps=10**6, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False, seed=0)
    return trl.GRPOTrainer(model=model, reward_funcs=trl_reward_fn(args.group, reward_log), args=conf,
                           train_dataset=data, processing_class=tok, callbacks=[callback])


def step_timer(r1jax_turn):
    """A TrainerCallback timing each optimizer step (on_step_begin -> on_step_end) and handing the
    turn to r1jax (`r1jax_turn()`) after each, outside the timed window."""
    import transformers

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.seconds, self._t0 = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._t0)
            r1jax_turn()

    return StepTimer()


def time_method(obj, name: str, log: dict, sync: bool = False) -> None:
    """Replace obj.name (a bound method) by one that appends each call's seconds to log[name];
    with `sync`, the time includes finishing the jax computations it returns."""
    inner = getattr(obj, name)
    log[name] = []

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = inner(*a, **k)
        if sync:
            jax.block_until_ready(out)
        log[name].append(time.perf_counter() - t0)
        return out

    setattr(obj, name, timed)


R1JAX_PARTS = ("rollout", "score", "advantages_and_masks", "logprob_passes", "updates")
TRL_PARTS = ("_generate_single_turn", "_calculate_rewards", "_generate_and_score_completions")


def part_rows(jx: dict, trl: dict) -> list[tuple[str, float | None, float | None]]:
    """(part, r1jax seconds, TRL seconds) per iteration part, medians after the warm-up; None where
    a framework has no such part. TRL's "advantages and other preparation" is the rest of
    `_generate_and_score_completions` (tokenizing, padding, advantages, metrics), and its update the
    rest of the step (the loss forward, backward and AdamW)."""
    def med(xs):
        return statistics.median(xs[1:])

    def per_it(log, name):
        return log["parts"][name]

    j, t = jx, trl
    t_gen, t_rew = per_it(t, "_generate_single_turn"), per_it(t, "_calculate_rewards")
    t_prep = per_it(t, "_generate_and_score_completions")
    t_other = [p - g - r for p, g, r in zip(t_prep, t_gen, t_rew)]
    t_update = [s - p for s, p in zip(t["seconds"], t_prep)]
    j_parts = {k: per_it(j, k) for k in R1JAX_PARTS}
    j_rest = [s - sum(j_parts[k][i] for k in R1JAX_PARTS) for i, s in enumerate(j["seconds"])]
    return [("generation (rollout)", med(j_parts["rollout"]), med(t_gen)),
            ("rewards", med(j_parts["score"]), med(t_rew)),
            ("advantages and other preparation", med(j_parts["advantages_and_masks"]) + med(j_rest), med(t_other)),
            ("pi_old log-prob pass", med(j_parts["logprob_passes"]), None),
            ("loss, backward, optimizer step", med(j_parts["updates"]), med(t_update)),
            ("whole iteration", med(j["seconds"]), med(t["seconds"]))]


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run(args) -> dict:
    """Both frameworks, taking turns; returns per-iteration lists for each (warm-up included)."""
    with tempfile.TemporaryDirectory() as tmp:
        model = hf_model("qwen2", args.d_model, args.layers, args.vocab, args.init_std)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp + "/hf")
        iteration, state, batch, mesh = r1jax_setup(tmp + "/hf", args)
        jx = {"seconds": [], "tokens": [], "reward_std": [], "parts": {}}
        for name in R1JAX_PARTS:
            time_method(iteration, name, jx["parts"], sync=name == "logprob_passes")
        holder = {"state": state}

        def r1jax_turn():
            with jax.set_mesh(mesh):
                t0 = time.perf_counter()
                new_state, m = iteration(holder["state"], batch, jax.random.key(args.seed))
                jax.block_until_ready(new_state)
                jx["seconds"].append(time.perf_counter() - t0)
            holder["state"] = new_state
            jx["tokens"].append(m["sampled_tokens"])
            jx["reward_std"].append(m["reward_std_in_group"])
            print(f"  r1jax iteration {len(jx['seconds'])}: {jx['seconds'][-1]:.2f} s, reward {m['reward']:.3f}, "
                  f"in-group std {m['reward_std_in_group']:.3f}, updates {m['updates']:.0f}", flush=True)

        timer, reward_std = step_timer(r1jax_turn), []
        trainer = trl_trainer(model, args, tmp + "/trl", timer, reward_std)
        trl = {"parts": {}, "reward_std": reward_std}
        for name in TRL_PARTS:
            time_method(trainer, name, trl["parts"])
        tokens = trl["tokens"] = []
        gen = trainer._generate_single_turn

        def counted(*a, **k):
            out = gen(*a, **k)
            tokens.append(sum(len(c) for c in out[0]))
            return out

        trainer._generate_single_turn = counted
        trainer.train()
        trl["seconds"] = timer.seconds
    return {"n_params": n_params, "r1jax": jx, "trl": trl}


def summary(side: dict) -> dict:
    """Medians over the iterations after the first (warm-up)."""
    s, t = side["seconds"][1:], side["tokens"][1:]
    sec = statistics.median(s)
    gen_name = "rollout" if "rollout" in side["parts"] else "_generate_single_turn"
    g = side["parts"][gen_name][1:]
    return {"seconds": sec, "tokens": statistics.median(t), "tok_s": statistics.median(t) / sec,
            "gen_share": statistics.median(gi / si for gi, si in zip(g, s)),
            "first": side["seconds"][0], "all": side["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description="one GRPO iteration: r1jax GRPOIteration vs TRL GRPOTrainer")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="G: samples per prompt")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new", type=int, default=64, help="new tokens per sample")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--init-std", type=float, default=0.05)
    p.add_argument("--reps", type=int, default=5, help="timed iterations after the warm-up one")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (both sides)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args()
    if args.vocab < 4 or args.d_model % 64 or args.group < 2 or args.prompts * args.group % args.grad_accum:
        p.error("need --vocab >= 4, --d-model a multiple of 64, --group >= 2, --grad-accum dividing prompts x group")

    import torch
    import transformers
    import trl

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    dev = jax.devices()[0]
    facts = (f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}) x{len(jax.devices())}; torch "
             f"{torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
             f"trl {trl.__version__}; {platform.machine()} {os.cpu_count()} CPUs; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(facts, flush=True)
    res = run(args)
    j, t = summary(res["r1jax"]), summary(res["trl"])
    n = args.prompts * args.group
    print(f"\n`{' '.join(['python', *sys.argv])}`\n\n{facts}\n\nQwen2 ({res['n_params'] / 1e6:.1f}M params): d_model "
          f"{args.d_model}, {args.layers} layers, vocab {args.vocab}; {args.prompts} prompts x G={args.group} = {n} "
          f"samples of {args.prompt_len} + {args.new} tokens; reward even_share (mean in-group std "
          f"r1jax {np.mean(res['r1jax']['reward_std']):.3f}, TRL {np.mean(res['trl']['reward_std']):.3f}); "
          f"beta {args.beta}; one optimizer step per iteration; median of {args.reps} after a warm-up iteration.\n")
    print("| framework | first iteration (compile/warm-up) | iteration (median) | generated tokens | tokens/s | "
          "generation share |")
    print("|---|---|---|---|---|---|")
    for name, r in (("r1jax GRPOIteration", j), ("TRL GRPOTrainer", t)):
        print(f"| {name} | {r['first']:.2f} s | {r['seconds']:.2f} s | {r['tokens']:,.0f} | {r['tok_s']:,.0f} | "
              f"{r['gen_share']:.0%} |")
    print("\n| part (median seconds) | r1jax | TRL | TRL / r1jax |")
    print("|---|---|---|---|")
    for part, a, b in part_rows(res["r1jax"], res["trl"]):
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        ratio = f"{b / a:.2f}x" if a and b is not None else "-"
        print(f"| {part} | {fmt(a)} | {fmt(b)} | {ratio} |")
    print(f"\nr1jax / TRL tokens/s: {j['tok_s'] / t['tok_s']:.2f}x; every iteration (s), warm-up first: r1jax "
          + ", ".join(f"{x:.2f}" for x in j["all"]) + "; TRL " + ", ".join(f"{x:.2f}" for x in t["all"]))


if __name__ == "__main__":
    main()
