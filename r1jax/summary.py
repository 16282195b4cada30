"""Model preset summary from abstract shapes: parameter counts, per-layer shapes, memory per device."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flax import nnx

from r1jax.config import Config, ModelConfig
from r1jax.models.layers import RouterBias
from r1jax.models.transformer import abstract_model
from r1jax.sharding import bytes_per_device


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every trainable parameter, MTP modules excluded
    mtp: int  # the MTP modules (their embedding and head are shared, so not counted again)
    active: int  # multiplied per token: routed experts k of E; no MTP, no input-embedding lookup
    embedding: int  # input embedding + untied output head


def _size(x) -> int:
    return math.prod(x.shape)


def count_params(cfg: ModelConfig, state: nnx.State | None = None) -> ParamCounts:
    """Counts from shapes only (jax.eval_shape; nothing allocated)."""
    if state is None:
        state = nnx.state(abstract_model(cfg), nnx.Param)
    total = mtp = routed = 0
    for path, var in nnx.to_flat_state(state):
        if not isinstance(var, nnx.Param):
            continue
        n = _size(var.get_value())
        if path[0] == "mtp":
            mtp += n
            continue
        total += n
        if path[-1] in ("w_gate", "w_up", "w_down") and "shared" not in path and path[-2] == "mlp" and cfg.is_moe \
                and path[0] == "moe_blocks":
            routed += n
    active = total - routed + (routed * cfg.num_experts_per_tok // cfg.n_routed_experts if cfg.is_moe else 0)
    if not cfg.tie_embeddings:  # the input table is a lookup, as in the DeepSeek reports' "activated"
        active -= cfg.vocab_size * cfg.d_model
    emb = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return ParamCounts(total=total, mtp=mtp, active=active, embedding=emb)


def layer_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], str, tuple]]:
    """(path, shape, dtype, logical axes) of every variable, stacked layers as one entry."""
    state = nnx.state(abstract_model(cfg))
    out = []
    for path, var in nnx.to_flat_state(state):
        v = var.get_value()
        out.append(("/".join(map(str, path)), tuple(v.shape), str(v.dtype), tuple(var.get_metadata("axes"))))
    return out


def _b(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _gib(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def summarize(cfg: Config, mesh_sizes: dict[str, int] | None = None, shapes: bool = True) -> str:
    """A printable summary of `cfg.model` on a mesh of `mesh_sizes` (default: cfg.mesh with -1 as 1)."""
    m = cfg.model
    model = abstract_model(m)
    params = nnx.state(model, nnx.Param)
    everything = nnx.state(model, (nnx.Param, RouterBias))
    c = count_params(m, params)
    if mesh_sizes is None:
        mesh_sizes = {k: max(getattr(cfg.mesh, k), 1) for k in ("data", "fsdp", "expert", "tensor")}
    n_dev = math.prod(mesh_sizes.values())
    lines = [f"{cfg.name or m.family} ({m.family})",
             f"  parameters: {_b(c.total)} total, {_b(c.active)} active per token (routed experts k of E, "
             f"input embedding lookup not counted, as DeepSeek reports it)"
             + (f"; MTP modules +{_b(c.mtp)}" if c.mtp else ""),
             f"  layers: {m.n_layers} = {m.n_dense_layers} dense + {m.n_moe_layers} MoE; d_model {m.d_model}, "
             f"{m.n_heads} heads ({'MLA' if m.is_mla else f'GQA, {m.kv_heads} kv heads'}), vocab {m.vocab_size}"]
    if m.is_moe:
        lines.append(f"  experts: {m.n_routed_experts} routed (top-{m.num_experts_per_tok}, {m.score_func}, "
                     f"{m.n_group} groups / top-{m.topk_group}) + {m.n_shared_experts} shared, hidden {m.moe_d_ff}")
    if shapes:
        lines.append("  variables (stacked layers on the leading axis):")
        for path, shape, dtype, axes in layer_shapes(m):
            lines.append(f"    {path:38s} {str(shape):24s} {dtype:9s} {axes}")
    p_dev = bytes_per_device(params, mesh_sizes)
    adam = bytes_per_device(params, mesh_sizes, dtype="float32") * 2
    other = bytes_per_device(everything, mesh_sizes) - p_dev
    mesh_txt = " ".join(f"{k}={v}" for k, v in mesh_sizes.items())
    lines.append(f"  memory per device on mesh {mesh_txt} ({n_dev} devices), MTP included:")
    lines.append(f"    params {_gib(p_dev)} ({m.param_dtype}); + grads {_gib(p_dev)}; + AdamW moments "
                 f"{_gib(adam)} (float32); router biases {_gib(other)}; total {_gib(2 * p_dev + adam + other)} "
                 f"before activations")
    return "\n".join(lines)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, with_mtp: bool = False) -> float:
    """Training FLOPs per token: 6 x matmul parameters a token uses (routed experts k of E, no
    embedding lookup) + attention scores and mixing counted once for causal masking, forward x 3.

    Attention per layer and token (forward): 2 * heads * (d_qk + d_v) * mean context, with mean
    context (seq_len + 1) / 2 for a full causal row.
    """
    c = count_params(cfg)
    params = c.active
    layers = cfg.n_layers
    if with_mtp and cfg.mtp_depth:
        mtp_active = c.mtp
        if cfg.is_moe:  # each MTP block is an MoE layer: its routed experts count k of E too
            per_expert = 3 * cfg.d_model * cfg.moe_d_ff
            mtp_active -= cfg.mtp_depth * per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
        head = cfg.vocab_size * cfg.d_model
        params += mtp_active + cfg.mtp_depth * head
        layers += cfg.mtp_depth
    if cfg.is_mla:
        dqk, dv = cfg.qk_head_dim, cfg.v_head_dim
    else:
        dqk = dv = cfg.gqa_head_dim
    attn = 2 * cfg.n_heads * (dqk + dv) * (seq_len + 1) / 2 * layers
    return 6.0 * params + 3.0 * attn
