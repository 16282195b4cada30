"""TrainState: step, params, optimizer state, router biases. Optimizer from config. Sharded init.

The state is a small pytree. The model's graph (nnx.GraphDef) and the optax transformation are
static and travel beside it in `StepContext`, bound to the update functions with functools.partial.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from r1jax.config import Config, ModelConfig, OptimizerConfig, TrainConfig
from r1jax.models.layers import RouterBias
from r1jax.models.transformer import Transformer, abstract_model
from r1jax.sharding import state_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # trainable parameters (nnx.Param)
    opt_state: Any  # optax state
    router_bias: nnx.State  # MoE correction biases (RouterBias): updated by rule, never by gradient


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What an update function needs besides (state, batch, rng): the model's graph and config, the
    optimizer and its schedule, and the step's hyperparameters. Static and hashable; bound to the
    update functions with functools.partial(step, ctx=ctx)."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: Any  # step -> learning rate
    model: ModelConfig
    grad_accum: int = 1  # microbatches per optimizer step
    balance_loss_coef: float = 0.0  # alpha of the sequence-wise balance loss (V3 section 2.1.2)
    bias_update_speed: float = 0.0  # gamma of the aux-loss-free balancer (V3 section 2.1.2)
    mtp: bool = False  # train the MTP modules (train.mtp and model.mtp_depth > 0)
    loss: Any = None  # the step's own loss settings, e.g. grpo.GRPOLoss for grpo_step


def learning_rate_schedule(opt: OptimizerConfig, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr over warmup_steps, then cosine/linear decay to lr * final_lr_ratio at
    `steps` (or constant)."""
    warm = opt.warmup_steps
    if opt.schedule == "constant":
        decay = optax.constant_schedule(opt.lr)
    elif opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(opt.lr, max(steps - warm, 1), alpha=opt.final_lr_ratio)
    else:
        decay = optax.linear_schedule(opt.lr, opt.lr * opt.final_lr_ratio, max(steps - warm, 1))
    if not warm:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warm), decay], [warm])


def decay_mask(params: nnx.State, opt: OptimizerConfig) -> nnx.State:
    """True for parameters that get weight decay: matrices, and by choice norms, biases, embeddings."""

    def wants_decay(path, _):
        name = path[-1]
        if name == "scale":  # RMSNorm
            return opt.decay_norms
        if name in ("bq", "bk", "bv"):
            return opt.decay_biases
        if path == ("embed",):
            return opt.decay_embeddings
        return True

    return nnx.map_state(lambda path, v: v.replace(wants_decay(tuple(str(p) for p in path), v)), params)


def make_optimizer(opt: OptimizerConfig, train: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(opt, train.steps)
    parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                             mask=lambda params: decay_mask(params, opt)))
    return optax.chain(*parts), schedule


def split_model(model: Transformer) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, router_bias)."""
    graphdef, params, bias = nnx.split(model, nnx.Param, RouterBias)
    return graphdef, params, bias


def make_context(cfg: Config, schedule_steps: int | None = None, loss: Any = None) -> StepContext:
    """The static half of a stage: model graph, optimizer, lr schedule over `schedule_steps`
    optimizer steps (default train.steps), the train section's update hyperparameters, and the
    step's own `loss` settings."""
    train = cfg.train if schedule_steps is None else dataclasses.replace(cfg.train, steps=schedule_steps)
    tx, schedule = make_optimizer(cfg.optimizer, train)
    graphdef, _, _ = split_model(abstract_model(cfg.model))
    return StepContext(graphdef=graphdef, tx=tx, schedule=schedule, model=cfg.model, grad_accum=train.grad_accum,
                       balance_loss_coef=train.balance_loss_coef, bias_update_speed=train.bias_update_speed,
                       mtp=bool(train.mtp and cfg.model.mtp_depth), loss=loss)


def _create(ctx: StepContext, key: jax.Array, params: nnx.State | None = None, bias: nnx.State | None = None):
    _, new_params, new_bias = split_model(Transformer(ctx.model, nnx.Rngs(key)))
    params = new_params if params is None else params
    bias = new_bias if bias is None else bias
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=ctx.tx.init(params), router_bias=bias)


def abstract_train_state(ctx: StepContext) -> TrainState:
    """Shapes and dtypes of the train state, nothing allocated (restore targets, dry runs)."""
    return jax.eval_shape(lambda k: _create(ctx, k), jax.random.key(0))


def train_state_shardings(ctx: StepContext, mesh) -> TrainState:
    """NamedShardings of every leaf: params by their logical axes, optimizer moments like their
    params, scalars (step, counts) replicated."""
    abstract = abstract_train_state(ctx)
    _, p_abs, b_abs = split_model(abstract_model(ctx.model))
    p_sh = state_shardings(p_abs, mesh)
    b_sh = state_shardings(b_abs, mesh)
    replicated = NamedSharding(mesh, P())
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    p_leaves = jax.tree.map(lambda v: v.get_value(), p_sh, is_leaf=is_var)
    opt_sh = optax.tree_map_params(ctx.tx, lambda _, s: s, abstract.opt_state, p_leaves,
                                   transform_non_params=lambda _: replicated,
                                   is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct) or is_var(x))
    return TrainState(step=replicated, params=jax.tree.map(lambda v: v.get_value(), p_sh, is_leaf=is_var),
                      opt_state=opt_sh, router_bias=jax.tree.map(lambda v: v.get_value(), b_sh, is_leaf=is_var))


def init_train_state(ctx: StepContext, key: jax.Array, mesh=None) -> TrainState:
    """A fresh train state; under `mesh` every array is created in its sharding (jitted init)."""
    if mesh is None:
        return jax.jit(lambda k: _create(ctx, k))(key)
    with jax.set_mesh(mesh):
        return jax.jit(lambda k: _create(ctx, k), out_shardings=train_state_shardings(ctx, mesh))(key)


def state_from_params(ctx: StepContext, params: nnx.State, bias: nnx.State, mesh=None) -> TrainState:
    """A train state that starts from given params (an earlier stage's), with a fresh optimizer."""
    fn = lambda p, b: _create(ctx, jax.random.key(0), p, b)  # noqa: E731
    if mesh is None:
        return jax.jit(fn)(params, bias)
    with jax.set_mesh(mesh):
        return jax.jit(fn, out_shardings=train_state_shardings(ctx, mesh))(params, bias)
