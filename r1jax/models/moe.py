"""DeepSeekMoE: shared experts + fine-grained routed experts, dropless, expert-parallel.

Routing (float32):
  s = sigmoid(x W_r) (V3) or softmax(x W_r) (V2)
  choice = s + b                    b: aux-loss-free correction bias, used for *selection only*
  group-limited: keep the topk_group groups with the best group score (V3: sum of the top-2
  choice scores in the group; V2: the max), mask out the other groups' experts
  top-k experts by choice; their gate weights come from the *unbiased* s, optionally normalised
  to sum 1, then times routed_scaling_factor.
Routing replay (grpo.routing_replay): a forward can be handed the experts to select per token
(those the sampler chose); the gate weights are still computed from the current scores.

Experts are computed without token dropping: the (token, expert) assignments are sorted by expert
and multiplied with a grouped matmul (`jax.lax.ragged_dot` on TPU, the tiled form of gmm.py
elsewhere, where XLA would lower ragged_dot densely), then unsorted and summed with their gate
weights. FLOPs are those of the k chosen experts per token; no dense one-hot over all experts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from r1jax.config import ModelConfig
from r1jax.models.dispatch import routed_experts_all_to_all
from r1jax.models.gmm import grouped_matmul
from r1jax.models.layers import DTYPES, MLP, RouterBias, param
from r1jax.sharding import active_mesh, logical_to_spec, mesh_shape


def router_scores(x: jax.Array, kernel: jax.Array, bias: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """The router of tokens x [T, d]: (scores s [T, E] float32, selection scores [T, E]: s + b,
    with the experts of groups outside the topk_group best set to -inf)."""
    logits = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32))  # [T, E]
    scores = jax.nn.sigmoid(logits) if cfg.score_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = scores + bias.astype(jnp.float32)
    if cfg.n_group > 1:
        t, e = choice.shape
        grouped = choice.reshape(t, cfg.n_group, e // cfg.n_group)
        if cfg.group_score == "top2_sum":
            group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [T, G]
        else:
            group_score = grouped.max(-1)
        _, top_groups = jax.lax.top_k(group_score, cfg.topk_group)
        keep = jnp.zeros_like(group_score, jnp.bool_).at[jnp.arange(t)[:, None], top_groups].set(True)
        choice = jnp.where(jnp.repeat(keep, e // cfg.n_group, axis=1), choice, -jnp.inf)
    return scores, choice


def gate_weights(scores: jax.Array, experts: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The gate weights [T, k] float32 of the chosen experts [T, k]: their unbiased scores,
    normalised to sum 1 under norm_topk_prob, times routed_scaling_factor."""
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor


def route(x: jax.Array, kernel: jax.Array, bias: jax.Array, cfg: ModelConfig, forced: jax.Array | None = None):
    """Expert choice for tokens x [T, d].

    forced [T, k] int (routing replay): the experts to use where a row is >= 0 (e.g. those the
    sampler chose for the token); rows of -1 choose their own. Only the selection is replayed:
    the gate weights come from the current scores, so the router still gets gradients.

    Returns (weights [T, k] float32, experts [T, k] int32, scores [T, E] float32).
    """
    weights, experts, scores, _ = route_and_replay(x, kernel, bias, cfg, forced)
    return weights, experts, scores


def route_and_replay(x: jax.Array, kernel: jax.Array, bias: jax.Array, cfg: ModelConfig,
                     forced: jax.Array | None = None):
    """`route`, and also the experts the router itself would choose ([T, k] int32; the same as the
    experts used when nothing is forced)."""
    scores, choice = router_scores(x, kernel, bias, cfg)
    own = jax.lax.top_k(choice, cfg.num_experts_per_tok)[1].astype(jnp.int32)
    experts = own if forced is None else jnp.where(forced >= 0, forced.astype(jnp.int32), own)
    return gate_weights(scores, experts, cfg), experts, scores, own


def route_dtype(n_experts: int):
    """The smallest signed integer type that holds expert ids 0..n_experts-1 and -1 (routes that
    were not recorded): recorded routes (sampling.generate(record_routes=True)) are kept in it."""
    for dt in (jnp.int8, jnp.int16):
        if n_experts - 1 <= jnp.iinfo(dt).max:
            return dt
    return jnp.int32


def expert_load(experts: jax.Array, token_mask: jax.Array, n_experts: int) -> jax.Array:
    """Assignments per expert [E] (float32) over the valid tokens. experts [..., k]; token_mask [...]."""
    w = jnp.broadcast_to(token_mask[..., None], experts.shape).astype(jnp.float32)
    return jnp.zeros((n_experts,), jnp.float32).at[experts.reshape(-1)].add(w.reshape(-1))


def sequence_balance_loss(scores: jax.Array, experts: jax.Array, token_mask: jax.Array, k: int) -> jax.Array:
    """Sequence-wise balance loss (DeepSeek-V3 eqs. 17-20), without the coefficient alpha.

    Per sequence of T valid tokens: f_i = N_r / (K_r T) * #{t: i in TopK_t},
    P_i = 1/T sum_t s_it / sum_j s_jt, loss = sum_i f_i P_i; averaged over sequences with tokens.
    scores [B, S, E]; experts [B, S, k]; token_mask [B, S] bool.
    """
    n = scores.shape[-1]
    m = token_mask.astype(jnp.float32)
    t = jnp.maximum(m.sum(-1), 1.0)  # [B]
    chosen = jnp.zeros(scores.shape, jnp.float32).at[
        jnp.arange(scores.shape[0])[:, None, None], jnp.arange(scores.shape[1])[None, :, None], experts
    ].set(1.0)
    f = n / (k * t[:, None]) * jnp.einsum("bse,bs->be", chosen, m)
    p = jnp.einsum("bse,bs->be", scores / scores.sum(-1, keepdims=True), m) / t[:, None]
    per_seq = (f * p).sum(-1)
    has = (m.sum(-1) > 0).astype(jnp.float32)
    return (per_seq * has).sum() / jnp.maximum(has.sum(), 1.0)


def routed_experts(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, first_expert: jax.Array | int = 0, impl: str = "auto") -> jax.Array:
    """Dropless expert FFN for tokens x [T, d] with choices experts/weights [T, k].

    w_gate, w_up [E_loc, d, f]; w_down [E_loc, f, d] hold experts first_expert .. first_expert+E_loc.
    Assignments to other experts contribute zero (they sort after the local groups, beyond the
    rows the grouped matmul computes). Returns sum_k weight * FFN_expert(x), [T, d] in x.dtype.
    """
    t, k = experts.shape
    e_loc = w_gate.shape[0]
    with jax.named_scope("dispatch"):
        local = experts.reshape(-1) - first_expert  # [T*k]
        key = jnp.where((local >= 0) & (local < e_loc), local, e_loc)
        order = jnp.argsort(key, stable=True)  # assignments grouped by local expert
        group_sizes = jnp.bincount(key, length=e_loc + 1)[:e_loc].astype(jnp.int32)
        xs = x[order // k]  # [T*k, d]
    dt = x.dtype
    with jax.named_scope("experts"):
        gate = grouped_matmul(xs, w_gate.astype(dt), group_sizes, impl)  # [T*k, f]
        up = grouped_matmul(xs, w_up.astype(dt), group_sizes, impl)
        ys = grouped_matmul(jax.nn.silu(gate) * up, w_down.astype(dt), group_sizes, impl)  # [T*k, d]
    with jax.named_scope("combine"):
        ys = ys.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        return ys[inverse].reshape(t, k, -1).sum(1).astype(dt)


def window_ffn(x: jax.Array, local: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
               impl: str = "auto") -> jax.Array:
    """The dropless FFN of rows x [W, d] for their local experts `local` [W] (e_loc: no expert,
    output 0): one all-to-all window (models/dispatch.py). [W, d] in x.dtype."""
    return routed_experts(x, local[:, None], jnp.ones(local.shape + (1,), jnp.float32), w_gate, w_up, w_down,
                          impl=impl)


def dispatch_path(dispatch: str, ep: int, k: int) -> str:
    """How routed_experts_sharded moves tokens for an expert group of `ep` shards that split the
    tokens too: "gather" (ep = 1 or asked), or "all_to_all" (asked, or auto with ep > k: then it
    moves fewer rows, k (ep-1)/ep against (ep-1) per token, and holds a bounded buffer)."""
    if ep <= 1 or dispatch == "gather":
        return "gather"
    return "all_to_all" if dispatch == "all_to_all" or ep > k else "gather"


def token_chunks(tokens: int, chunk: int) -> int:
    """Into how many equal chunks the all-to-all dispatch splits a device's `tokens` for chunks of
    at most `chunk` tokens (0: one): the fewest that divide `tokens` evenly."""
    if chunk <= 0 or chunk >= tokens:
        return 1
    n = -(-tokens // chunk)
    while tokens % n:
        n += 1
    return n


def routed_experts_sharded(x, experts, weights, w_gate, w_up, w_down, mesh, impl: str = "auto",
                           dispatch: str = "auto", capacity: float = 2.0, chunk: int = 0):
    """Expert-parallel routed experts over `mesh`; x [B, S, d], experts/weights [B, S, k].
    Returns (y [B, S, d], rounds: int32 scalar, the all-to-all rounds this layer ran, 1 for gather).

    Layout: tokens are sharded over (data, fsdp, expert); expert weights over experts -> expert,
    d_model -> fsdp, hidden -> tensor. Per device, inside shard_map, after all-gathering the expert
    weights' fsdp shards (ZeRO-3, one layer at a time), one of two dispatches (dispatch_path):

    gather:
      1. all-gather the tokens (and their choices) over the `expert` axis, so each expert shard
         sees every token of its expert-parallel group;
      2. compute only the assignments that hit its local experts (dropless grouped matmul), with the
         hidden dimension split over `tensor`;
      3. psum over `tensor`, then reduce-scatter over `expert`: each device gets back the complete
         sum over all k experts for its own tokens.
      Communication per layer and device, with T local tokens, ep expert shards: (ep-1) T d in the
      all-gather and (ep-1) T d in the reduce-scatter; memory ep T tokens and ep T k rows. No
      capacity factor or padding.

    all_to_all (models/dispatch.py): each (token, choice) row goes to its expert's shard by a
      ragged all-to-all and back, in rounds of a bounded receive buffer (capacity x T k rows);
      then psum over `tensor`. Communication about k T d (ep-1)/ep each way; memory independent
      of ep; dropless (a skewed batch takes extra rounds). With `chunk` > 0 (model.moe_chunk) the
      device's tokens go in chunks of at most that many, one after another (`lax.map`), so the
      buffers follow the chunk, not the sequence (the backward keeps each chunk's sorted inputs).

    Expert axes that do not shard the tokens (tokens replicated over them) need no exchange: each
    shard computes its experts' rows and a psum adds them (both paths).
    """
    ms = mesh_shape(mesh)
    batch = logical_to_spec(("batch", None, None), ms, x.shape)
    gate_spec = logical_to_spec(("experts", "embed", "mlp"), ms, w_gate.shape)
    down_spec = logical_to_spec(("experts", "mlp", "embed"), ms, w_down.shape)

    def axes_of(entry):
        return () if entry is None else (entry if isinstance(entry, tuple) else (entry,))

    expert_axes, fsdp_axes, tensor_axes = axes_of(gate_spec[0]), axes_of(gate_spec[1]), axes_of(gate_spec[2])
    token_axes = axes_of(batch[0])
    gather_axes = tuple(a for a in expert_axes if a in token_axes)  # tokens split over these: gather
    sum_axes = tuple(a for a in expert_axes if a not in token_axes)  # tokens replicated: plain psum
    ep = 1
    for ax in gather_axes:
        ep *= ms[ax]
    k = experts.shape[-1]
    path = dispatch_path(dispatch, ep, k) if not sum_axes else "gather"  # all_to_all: one expert group

    def local(x, experts, weights, w_gate, w_up, w_down):
        if fsdp_axes:
            w_gate = jax.lax.all_gather(w_gate, fsdp_axes, axis=1, tiled=True)
            w_up = jax.lax.all_gather(w_up, fsdp_axes, axis=1, tiled=True)
            w_down = jax.lax.all_gather(w_down, fsdp_axes, axis=2, tiled=True)
        b, s, d = x.shape
        if path == "all_to_all":
            ffn = functools.partial(window_ffn, impl=impl)
            t = b * s
            n = token_chunks(t, chunk)

            def dispatch_chunk(args):
                return routed_experts_all_to_all(*args, w_gate, w_up, w_down, ffn, axis_name=gather_axes, ep=ep,
                                                 capacity=capacity, all_axes=tuple(mesh.axis_names))

            flat = (x.reshape(t, d), experts.reshape(t, k), weights.reshape(t, k))
            if n == 1:
                y, rounds = dispatch_chunk(flat)
            else:  # one chunk of t / n tokens after another: buffers of a chunk's size
                y, rounds = jax.lax.map(dispatch_chunk, tuple(a.reshape(n, t // n, a.shape[1]) for a in flat))
                y, rounds = y.reshape(t, d), jnp.max(rounds)
            y = y.reshape(b, s, d)
            if tensor_axes:
                with jax.named_scope("combine"):
                    y = jax.lax.psum(y, tensor_axes)
            return y, rounds
        if gather_axes:
            with jax.named_scope("dispatch"):
                x, experts, weights = (jax.lax.all_gather(a, gather_axes, axis=0, tiled=True)
                                       for a in (x, experts, weights))
        b, s, d = x.shape
        shard = 0
        for ax in expert_axes:  # linear index of this device's expert shard
            shard = shard * ms[ax] + jax.lax.axis_index(ax)
        y = routed_experts(x.reshape(b * s, d), experts.reshape(b * s, -1), weights.reshape(b * s, -1),
                           w_gate, w_up, w_down, first_expert=shard * w_gate.shape[0], impl=impl).reshape(b, s, d)
        with jax.named_scope("combine"):
            if tensor_axes or sum_axes:
                y = jax.lax.psum(y, tensor_axes + sum_axes)
            if gather_axes:
                y = jax.lax.psum_scatter(y, gather_axes, scatter_dimension=0, tiled=True)
        return y, jnp.ones((), jnp.int32)

    return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, batch, gate_spec, gate_spec, down_spec),
                         out_specs=(batch, P()), check_vma=False)(x, experts, weights, w_gate, w_up, w_down)


class MoE(nnx.Module):
    """Router + routed experts (+ shared experts). Returns (output, aux) with aux the expert load
    counts [E], the unweighted sequence-wise balance loss of this layer and its dispatch rounds
    (int32; above 1 only when the all-to-all dispatch needed extra rounds)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pd, std = DTYPES[cfg.param_dtype], cfg.init_std
        e, d, f = cfg.n_routed_experts, cfg.d_model, cfg.moe_d_ff
        self.router = param(rngs, (d, e), ("embed", "router"), jnp.float32, std=std)
        self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32), axes=("router",))
        self.w_gate = param(rngs, (e, d, f), ("experts", "embed", "mlp"), pd, std=std)
        self.w_up = param(rngs, (e, d, f), ("experts", "embed", "mlp"), pd, std=std)
        self.w_down = param(rngs, (e, f, d), ("experts", "mlp", "embed"), pd, std=std)
        if cfg.n_shared_experts:
            self.shared = MLP(d, cfg.n_shared_experts * f, cfg, rngs)

    def __call__(self, x: jax.Array, token_mask: jax.Array, routes: jax.Array | None = None,
                 want_routes: bool = False) -> tuple[jax.Array, dict]:
        """x [B, S, d]; routes [B, S, k] int: experts to replay (rows of -1 route themselves);
        want_routes: aux also holds `experts` [B, S, k] int32, the selection used. With routes,
        aux holds `route_flips` (replayed tokens whose own top-k set differs from the replayed one)
        and `route_replayed` (replayed valid tokens), float32 counts."""
        cfg = self.cfg
        b, s, d = x.shape
        k = cfg.num_experts_per_tok
        with jax.named_scope("routing"):
            forced = None if routes is None else routes.reshape(b * s, k)
            weights, experts, scores, own = route_and_replay(x.reshape(b * s, d), self.router[...],
                                                             self.router_bias[...], cfg, forced)
        weights, experts = weights.reshape(b, s, -1), experts.reshape(b, s, -1)
        mesh = active_mesh()
        wg, wu, wd = self.w_gate[...], self.w_up[...], self.w_down[...]
        rounds = jnp.ones((), jnp.int32)
        if mesh is None:
            y = routed_experts(x.reshape(b * s, d), experts.reshape(b * s, -1), weights.reshape(b * s, -1),
                               wg, wu, wd, impl=cfg.moe_impl).reshape(b, s, d)
        else:
            y, rounds = routed_experts_sharded(x, experts, weights, wg, wu, wd, mesh, cfg.moe_impl,
                                               cfg.moe_dispatch, cfg.moe_capacity, cfg.moe_chunk)
        if cfg.n_shared_experts:
            with jax.named_scope("shared_experts"):
                y = y + self.shared(x)
        aux = {
            "load": expert_load(experts, token_mask, cfg.n_routed_experts),
            "balance_loss": sequence_balance_loss(scores.reshape(b, s, -1), experts, token_mask,
                                                  cfg.num_experts_per_tok),
            "rounds": rounds,
        }
        if want_routes:
            aux["experts"] = experts
        if routes is not None:
            replayed = (forced[:, 0] >= 0) & token_mask.reshape(-1)
            differs = jnp.any(jnp.sort(own, -1) != jnp.sort(forced.astype(jnp.int32), -1), axis=-1)
            aux["route_flips"] = jnp.sum(differs & replayed).astype(jnp.float32)
            aux["route_replayed"] = jnp.sum(replayed).astype(jnp.float32)
        return y, aux

