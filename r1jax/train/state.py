"""TrainState: step, params, optimizer state, router biases. Optimizer from config. Sharded init.

The state is a small pytree. The model's graph (nnx.GraphDef) and the optax transformation are
static and travel beside it in `StepContext`, bound to the update functions with functools.partial.

Precision of training. The params are stored in model.param_dtype and the model computes in
model.dtype; the presets of real models keep float32 master params with bfloat16 compute. Each
weight is cast to the compute dtype where a layer uses it (`w[...].astype(x.dtype)`), inside the
scanned layer body: one [layer's shape] cast per layer and pass, never a cast of the whole [L, ...]
stack (checked on the compiled step in tests/test_precision.py). Without remat the backward keeps
those bfloat16 copies as residuals (one bfloat16 copy of the layer weights lives from the forward
to the backward); with remat full / dots the backward recomputes the cast instead. The optimizer
(make_optimizer) runs Adam in float32 and stores its moments in optimizer.moments_dtype (float32 by
default, also under bfloat16 params); the update p + u is formed in float32 and rounded to the
param dtype, to nearest or stochastically (update.apply_updates).
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

from r1jax.config import Config, ConfigError, ModelConfig, OptimizerConfig, TrainConfig
from r1jax.models.layers import DTYPES, RouterBias
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
    stochastic_rounding: bool = False  # round p + u to the (bfloat16) params stochastically
    seed: int = 0  # train.seed: the stochastic-rounding stream is a function of (seed, step, leaf)


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


def global_norm(tree) -> jax.Array:
    """sqrt(sum of squares of every element of `tree`), float32 scalar.

    Each leaf is contracted with itself over all its axes (a dot_general accumulating in float32),
    so bfloat16 gradients are summed in float32 without a float32 copy of them (optax.global_norm
    squares and sums in the leaf dtype and returns a bfloat16 norm), and a sharded leaf is summed
    where it lies (partial sums, then one all-reduce), never reshaped. Checked against a float64
    sum in tests/test_precision.py."""
    def sq(x):
        axes = tuple(range(x.ndim))
        return jax.lax.dot_general(x, x, ((axes, axes), ((), ())), preferred_element_type=jnp.float32)

    return jnp.sqrt(sum(sq(x) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm's rule: g -> g * max_norm / ||g|| when ||g|| > max_norm (||.||:
    global_norm), applied as one float32 scalar factor times each leaf, the result float32 (optax
    returns the grads' dtype: bfloat16 gradients would be clipped and rounded to bfloat16 again).

    The factor fuses into each consumer (Adam's mu and nu updates): the compiled SFT step holds no
    clipped copy of the gradients (its temp bytes stay below one grads-sized buffer,
    tests/test_precision.py). Same state as optax's (EmptyState)."""
    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        scale = jnp.where(norm > max_norm, max_norm / norm, 1.0).astype(jnp.float32)
        return jax.tree.map(lambda g: g.astype(jnp.float32) * scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_adam(b1: float, b2: float, eps: float, moments_dtype) -> optax.GradientTransformation:
    """optax.scale_by_adam computed in float32, its moments mu and nu stored in `moments_dtype`.

    The gradients are cast to float32 before the moment updates, so the moment arithmetic, the bias
    corrections and the returned updates (mu_hat / (sqrt(nu_hat) + eps), float32, shaped like the
    params) are float32 for any param dtype; mu and nu are rounded to `moments_dtype` only when
    stored. With float32 params and moments every cast is the identity and the step is exactly
    optax's. The state is optax's ScaleByAdamState (checkpoints keep their layout).
    """
    inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=moments_dtype)

    def init(params):
        state = inner.init(params)
        return state._replace(nu=optax.tree.cast(state.nu, moments_dtype))  # optax: nu like the params

    def update(updates, state, params=None):
        return inner.update(jax.tree.map(lambda g: g.astype(jnp.float32), updates), state, params)

    return optax.GradientTransformation(init, update)


def make_optimizer(opt: OptimizerConfig, train: TrainConfig,
                   model: ModelConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(global-norm clip ->) AdamW, and its lr schedule over train.steps.

    The clip is clip_by_global_norm above (optax's rule, as a scalar factor); AdamW is optax.adamw's chain (scale_by_adam -> decayed weights under decay_mask -> -lr), with
    the float32 scale_by_adam above and moments in opt.moments_dtype ("float32", or "params": the
    model's param dtype). The updates it returns are float32; apply_gradients adds them to the
    params. ConfigError (one line naming the key) for settings the model cannot take.
    """
    errors = opt.model_errors(model)
    if errors:
        raise ConfigError(f"optimizer.{errors[0][0]}: {errors[0][1]}")
    schedule = learning_rate_schedule(opt, train.steps)
    moments = jnp.float32 if opt.moments_dtype == "float32" else DTYPES[model.param_dtype]
    parts = [clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
    parts.append(optax.chain(scale_by_adam(opt.b1, opt.b2, opt.eps, moments),
                             optax.add_decayed_weights(opt.weight_decay, lambda params: decay_mask(params, opt)),
                             optax.scale_by_learning_rate(schedule)))
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
    tx, schedule = make_optimizer(cfg.optimizer, train, cfg.model)
    graphdef, _, _ = split_model(abstract_model(cfg.model))
    return StepContext(graphdef=graphdef, tx=tx, schedule=schedule, model=cfg.model, grad_accum=train.grad_accum,
                       balance_loss_coef=train.balance_loss_coef, bias_update_speed=train.bias_update_speed,
                       mtp=bool(train.mtp and cfg.model.mtp_depth), loss=loss,
                       stochastic_rounding=cfg.optimizer.stochastic_rounding, seed=train.seed)


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
