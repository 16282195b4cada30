"""The SFT stage driver: `r1jax sft CONFIG` (cold start, the second SFT, sequence distillation).

Packed batches from the data pipeline -> the jitted `train.sft.sft_step` (donated state, explicit
shardings) in the shared stage loop, with held-out greedy evaluation and Orbax checkpoints.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from r1jax.config import Config
from r1jax.data.pipeline import GlobalBatchLoader, heldout, make_source
from r1jax.evaluate import heldout_eval_fn
from r1jax.sharding import batch_sharding
from r1jax.stages.grpo import heldout_scorer
from r1jax.stages.loop import run_loop
from r1jax.stages.result import StageResult
from r1jax.stages.start import start_stage
from r1jax.summary import train_flops_per_token
from r1jax.train.sft import sft_step
from r1jax.train.state import train_state_shardings

# step_builder(ctx, mesh, tokenizer, state_shardings, batch_sharding) -> step_fn(state, batch, rng)
StepBuilder = Callable


def run_sft(cfg: Config, step_builder: StepBuilder | None = None, kind: str = "sft") -> StageResult:
    """Run (or resume) an SFT stage on cfg.data. `step_builder` replaces the SFT update (logit
    distillation trains through the same loop)."""
    source = make_source(cfg.data, cfg.data.split)
    start = start_stage(cfg, source)
    ctx, mesh, tok = start.ctx, start.mesh, start.tokenizer
    loader = GlobalBatchLoader(source, tok, cfg.data, cfg.train.batch_size, cfg.train.seq_len, batch_sharding(mesh))
    if start.data_state is not None:
        loader.restore(start.data_state)
    shardings = train_state_shardings(ctx, mesh)
    if step_builder is None:
        step_fn = jax.jit(functools.partial(sft_step, ctx=ctx), donate_argnums=0,
                          in_shardings=(shardings, batch_sharding(mesh), None), out_shardings=(shardings, None))
    else:
        step_fn = step_builder(ctx, mesh, tok, shardings, batch_sharding(mesh))
    records = heldout(cfg.data, cfg.train.eval_examples) if cfg.train.eval_examples else []
    scorer = heldout_scorer(cfg)
    eval_fn = heldout_eval_fn(ctx.graphdef, mesh, tok, cfg.data.template, records, cfg.train.eval_max_new_tokens,
                              scorer=scorer)

    flops = train_flops_per_token(cfg.model, cfg.train.seq_len, with_mtp=cfg.train.mtp)
    try:
        with jax.set_mesh(mesh):
            state, result = run_loop(cfg, step_fn, start.state, loader, data_state=loader.state,
                                     checkpointer=start.checkpointer, tokenizer_files=tok.files(),
                                     flops_per_token=flops, eval_fn=eval_fn, eval_every=cfg.train.eval_every)
    finally:
        scorer.close()
        loader.close()
        if start.checkpointer is not None:
            start.checkpointer.close()
    return StageResult(kind=kind, stop=result.stop, how=start.how, step=result.step, last=result.last,
                       evals=result.evals, history=result.history, state=state, tokenizer=tok, ctx=ctx)
