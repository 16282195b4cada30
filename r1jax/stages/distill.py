"""The distillation stage driver: `r1jax distill CONFIG`.

distill.mode sequence is the paper's distillation (R1 section 2.4): SFT of the student on the
teacher's accepted samples (data.path or data.train_path: a rejection-sampling dataset).
distill.mode logits runs the frozen teacher checkpoint distill.teacher beside the student on the
same mesh and batch, and the student minimises distill.loss (`train.distill.distill_step`).
Both resume like SFT.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from r1jax.config import Config
from r1jax.errors import ConfigError
from r1jax.models.layers import RouterBias
from r1jax.stages.result import StageResult
from r1jax.stages.sft import run_sft
from r1jax.stages.start import load_policy
from r1jax.train.distill import distill_step
from r1jax.train.state import StepContext


def run_distill(cfg: Config) -> StageResult:
    """Train the student `model` on `data` by distill.mode (see the module docstring)."""
    d = cfg.distill
    if d.mode == "sequence":
        return run_sft(cfg, kind="distill")

    def build(ctx: StepContext, mesh, tok, shardings, batch_sharding):
        mesh_overrides = [f"mesh.{k}={getattr(cfg.mesh, k)}" for k in ("data", "fsdp", "expert", "tensor")]
        teacher = load_policy(d.teacher, mesh_overrides)
        if teacher.tokenizer is None or teacher.tokenizer.files() != tok.files():
            raise ConfigError(f"distill.teacher: {d.teacher} was trained with another tokenizer than this student's "
                              "(logit distillation compares token distributions: set tokenizer.path to the teacher's)")
        t_params, t_bias = nnx.split_state(teacher.state, nnx.Param, RouterBias)
        step = jax.jit(functools.partial(distill_step, ctx=ctx, teacher_graphdef=teacher.graphdef,
                                         vocab=tok.vocab_size, kind=d.loss, beta=d.jsd_beta, tau=d.temperature,
                                         top_k=d.top_k, ce_weight=d.ce_weight),
                       donate_argnums=0, out_shardings=(shardings, None))
        return lambda state, batch, rng: step(state, t_params, t_bias, batch, rng)

    return run_sft(cfg, step_builder=build, kind="distill")
