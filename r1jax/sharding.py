"""Device mesh, logical axis names and the one table that maps them to mesh axes.

Every parameter carries logical axis names in its `axes` metadata (set where it is created), and
activations are constrained with `constrain(x, axes)`. `RULES` below is the only place that says
which mesh axis shards which logical axis. Within one tensor a mesh axis is used at most once:
the first dimension that asks for it gets it, later ones fall back to the remaining axes (so
`embed` is sharded over fsdp+expert for dense weights, and only over fsdp for expert weights
whose `experts` dimension already took the expert axis).

Mesh axes:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3)
  expert  expert parallelism for routed experts; data parallelism for everything else
  tensor  Megatron-style tensor parallelism over heads, MLP hidden units and vocabulary

Two layouts: "train" (RULES) and "decode" (DECODE_RULES: the same, without sharding d_model or the
MLA latents over fsdp/expert), which the sampler uses for rollouts (`use_layout`): a decode step
touches every weight once per token, so FSDP's per-step weight all-gathers would dominate it.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from r1jax.config import ConfigError, MeshConfig, ModelConfig, mesh_model_errors

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axes that shard it, in order of preference.
RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "layers": (),  # the stacked-layer axis of scanned blocks
    "vocab": ("tensor",),
    "embed": ("fsdp", "expert"),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "q_lora": ("fsdp", "expert"),  # MLA up-projections have no d_model dim: shard the latent one
    "kv_lora": ("fsdp", "expert"),
    "mlp": ("tensor",),
    "experts": ("expert",),
    "router": (),  # router columns, one per expert (the router is float32 and small)
    "norm": (),
    # activations
    "batch": BATCH_AXES,
    "length": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}


# The decode layout: experts stay on the expert axis, heads / hidden / vocabulary on tensor; nothing
# splits d_model, so no parameter is all-gathered inside the decode loop (tests/test_sampling.py).
DECODE_RULES: dict[str, tuple[str, ...]] = {**RULES, "embed": (), "q_lora": (), "kv_lora": ()}
LAYOUTS = {"train": RULES, "decode": DECODE_RULES}
_layout: contextvars.ContextVar[str] = contextvars.ContextVar("r1jax_layout", default="train")


@contextlib.contextmanager
def use_layout(name: str) -> Iterator[None]:
    """Within the block, logical_to_spec (parameter shardings, the MoE shard_map's weight specs)
    follows layout `name` ("train" or "decode")."""
    if name not in LAYOUTS:
        raise ValueError(f"layout {name!r}: expected one of {sorted(LAYOUTS)}")
    token = _layout.set(name)
    try:
        yield
    finally:
        _layout.reset(token)


def logical_to_spec(axes: Sequence[str | None], mesh_shape: dict[str, int] | None = None,
                    shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for logical `axes` under the current layout's rules (RULES unless
    `use_layout("decode")`), each mesh axis used at most once.

    With `mesh_shape` and `shape`, mesh axes that do not divide the dimension are skipped for it
    (so a small vector is replicated rather than failing); axes of size 1 are dropped.
    """
    rules = LAYOUTS[_layout.get()]
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in RULES:
            raise KeyError(f"logical axis {name!r} is not in r1jax.sharding.RULES")
        chosen = []
        for ax in rules[name]:
            if ax in used:
                continue
            if mesh_shape is not None:
                size = mesh_shape.get(ax, 1)
                if size == 1:
                    continue
                if shape is not None and shape[i] % (math.prod(mesh_shape[a] for a in chosen) * size):
                    continue
            chosen.append(ax)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None,
              model: ModelConfig | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, expert, tensor) over `devices` (default: all devices).

    Axis types are Auto: the compiler propagates shardings between our constraints (Explicit
    axes would reject the row-parallel matmuls of tensor parallelism).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_cfg.resolve(len(devices))
    if model is not None:
        for key, msg in mesh_model_errors(sizes, model):
            raise ConfigError(f"{key}: {msg}")
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        dev_array = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # non-physical device counts (fake CPU devices, subsets)
        dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_shape(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes)) if hasattr(mesh, "axis_sizes") else dict(mesh.shape)


def active_mesh():
    """The mesh set by `jax.set_mesh`, or None outside one (single-device unit tests)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.axis_sizes) == 1:
        return None
    return mesh


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical axis names; a no-op without an active mesh."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh_shape(mesh), x.shape))


def variable_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    axes = var.get_metadata("axes", None)
    if axes is None:
        raise ValueError(f"variable of shape {var.get_value().shape} has no logical `axes` metadata")
    return tuple(axes)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_specs(state: nnx.State, mesh_sizes: dict[str, int]) -> nnx.State:
    """PartitionSpecs (as Variable values) for every Variable of `state` (abstract or real)."""

    def spec(v):
        axes = variable_axes(v)
        shape = v.get_value().shape
        if len(axes) != len(shape):
            raise ValueError(f"axes {axes} do not match shape {shape}")
        return v.replace(logical_to_spec(axes, mesh_sizes, shape))

    return jax.tree.map(spec, state, is_leaf=_is_var)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings for every Variable of `state`, usable as jit out_shardings."""
    specs = state_specs(state, mesh_shape(mesh))
    return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, v.get_value())), specs, is_leaf=_is_var)


def bytes_per_device(state: nnx.State, mesh_sizes: dict[str, int], dtype=None) -> int:
    """Bytes one device holds for `state` under RULES on a mesh of `mesh_sizes` (no devices needed)."""
    total = 0
    specs = state_specs(state, mesh_sizes)
    for v, s in zip(jax.tree.leaves(state, is_leaf=_is_var), jax.tree.leaves(specs, is_leaf=_is_var)):
        arr = v.get_value()
        itemsize = np.dtype(dtype or arr.dtype).itemsize
        local = 1
        for dim, entry in zip(arr.shape, s.get_value()):
            names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
            local *= -(-dim // math.prod(mesh_sizes[a] for a in names))
        total += local * itemsize
    return total


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input array: batch over data+fsdp+expert, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh_shape(mesh)))
