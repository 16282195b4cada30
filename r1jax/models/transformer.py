"""The decoder: embedding -> first-k dense blocks -> MoE blocks -> norm -> head (+ MTP modules).

One class covers DeepSeek-V3/R1, DeepSeek-V2(-Lite), Qwen2/2.5 and Llama 3 through ModelConfig.
Blocks of one kind are stacked on a leading `layers` axis and run with `jax.lax.scan`, so compile
time does not grow with depth and the 61-layer 671B model traces like a 2-layer one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.models.attention import GQAttention, MLAttention
from r1jax.models.layers import DTYPES, MLP, RMSNorm, param, rope_cos_sin
from r1jax.models.moe import MoE
from r1jax.sharding import constrain, state_shardings


def stack_modules(n: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
    """n independently initialised copies of make(rngs) as one module whose variables are stacked
    on a new leading axis named `layers`.

    Layers are created by a scan, not a vmap: under a jitted sharded init the temporaries of
    random initialisation then live for one layer at a time instead of for the whole stack.
    """
    keys = jax.random.split(rngs.params(), n)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    _, states = jax.lax.scan(lambda _, k: (None, nnx.split(make(nnx.Rngs(k)))[1]), None, keys)
    module = nnx.merge(graphdef, states)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable):
            var.set_metadata(axes=("layers",) + tuple(var.get_metadata("axes")))
    return module


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def scan_modules(stacked: nnx.Module, fn: Callable, carry: Any, xs: Any = None, remat: str = "none") -> tuple[Any, Any]:
    """lax.scan of fn(module_i, carry, x_i) -> (carry, y_i) over a stack_modules() stack, each
    step rematerialised in the backward pass under `remat` (none | full | dots)."""
    graphdef, state = nnx.split(stacked)

    def body(c, inputs):
        layer_state, x = inputs
        return fn(nnx.merge(graphdef, layer_state), c, x)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(body, carry, (state, xs))


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)); then x + ffn(norm(x)), ffn dense or MoE."""

    def __init__(self, cfg: ModelConfig, moe: bool, rngs: nnx.Rngs):
        pd = DTYPES[cfg.param_dtype]
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, rngs)
        self.attn = MLAttention(cfg, rngs) if cfg.is_mla else GQAttention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, rngs)
        self.mlp = MoE(cfg, rngs) if moe else MLP(cfg.d_model, cfg.d_ff, cfg, rngs)

    def __call__(self, x: jax.Array, ctx: dict) -> tuple[jax.Array, dict]:
        x = constrain(x, ("batch", "length", "act_embed"))
        want_cache = bool(ctx.get("want_cache"))
        with jax.named_scope("attention"):
            out = self.attn(self.attn_norm(x), ctx["cos"], ctx["sin"], ctx["segment_ids"], ctx.get("lengths"),
                            want_cache=want_cache)
        out, cache = out if want_cache else (out, None)
        x = x + out
        y, aux = self._ffn(x, ctx["token_mask"], ctx.get("routes"), bool(ctx.get("want_routes")))
        return x + y, (dict(aux, cache=cache) if want_cache else aux)

    def _ffn(self, x: jax.Array, token_mask: jax.Array, routes: jax.Array | None = None,
             want_routes: bool = False) -> tuple[jax.Array, dict]:
        h = self.mlp_norm(x)
        if isinstance(self.mlp, MoE):
            with jax.named_scope("moe"):
                return self.mlp(h, token_mask, routes, want_routes)
        with jax.named_scope("mlp"):
            return self.mlp(h), {}

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: dict, pos: jax.Array, layer: jax.Array,
               want_routes: bool = False):
        """One token per row: x [B, 1, d] -> (x, the group's cache with layer `layer` updated in place);
        with want_routes, also the experts the token selected [B, 1, k] (a MoE block)."""
        with jax.named_scope("attention"):
            out, cache = self.attn.decode(self.attn_norm(x), cos, sin, cache, pos, layer)
        x = x + out
        y, aux = self._ffn(x, jnp.ones(x.shape[:2], bool), want_routes=want_routes)
        return (x + y, cache, aux["experts"]) if want_routes else (x + y, cache)


class MTPModule(nnx.Module):
    """Multi-token prediction module k (DeepSeek-V3 section 2.2, eqs. 21-23).

    h'_i = W [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)] -> decoder block -> h^k_i; logits come from
    the shared output head applied to RMSNorm_k(h^k_i). The concatenation order (embedding first)
    is that of the released checkpoints (`eh_proj`), which reverses the order written in eq. 21.
    h^0 is the main model's final normalised hidden state; h^k (k >= 1) is this module's normalised
    output, so every depth sees the same kind of input.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = DTYPES[cfg.param_dtype]
        self.enorm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, rngs)
        self.hnorm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, rngs)
        self.eh_proj = param(rngs, (2 * cfg.d_model, cfg.d_model), ("embed", None), pd, std=cfg.init_std)
        self.block = Block(cfg, moe=cfg.is_moe, rngs=rngs)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, rngs)

    def __call__(self, h_prev: jax.Array, emb_next: jax.Array, ctx: dict) -> tuple[jax.Array, dict]:
        x = jnp.concatenate([self.enorm(emb_next), self.hnorm(h_prev)], axis=-1)
        h, aux = self.block(x @ self.eh_proj[...].astype(x.dtype), ctx)
        return self.norm(h), aux


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = DTYPES[cfg.param_dtype]
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pd, std=cfg.init_std)
        if cfg.n_dense_layers:
            self.dense_blocks = stack_modules(cfg.n_dense_layers, lambda r: Block(cfg, False, r), rngs)
        if cfg.n_moe_layers:
            self.moe_blocks = stack_modules(cfg.n_moe_layers, lambda r: Block(cfg, True, r), rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pd, std=cfg.init_std)
        if cfg.mtp_depth:
            self.mtp = stack_modules(cfg.mtp_depth, lambda r: MTPModule(cfg, r), rngs)
        if cfg.score_head:  # a reward model's scalar head (float32, like the router)
            self.score_head = param(rngs, (cfg.d_model,), ("embed",), jnp.float32, std=cfg.init_std)

    def score(self, tokens: jax.Array, last: jax.Array, positions: jax.Array | None = None,
              segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """A reward model's scalar score of each row, float32 [B] (model.score_head): the final
        normalised hidden state at position `last` [B] (the row's last token, its eos) dotted with
        the head; and the forward's aux (MoE loads and balance loss). tokens [B, S]."""
        h, aux = self(tokens, positions, segment_ids, logits=False)
        h_last = jnp.take_along_axis(h, last[:, None, None].astype(jnp.int32), axis=1)[:, 0]  # [B, d_model]
        with jax.named_scope("score_head"):
            return jnp.dot(h_last.astype(jnp.float32), self.score_head[...]), aux

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """[B, S] int -> [B, S, d_model] in the compute dtype."""
        x = jnp.take(self.embed[...], tokens, axis=0).astype(DTYPES[self.cfg.dtype])
        return constrain(x, ("batch", "length", "act_embed"))

    def head_weight(self) -> jax.Array:
        """The output head's weight [d_model, vocab] as stored (the embedding's transpose when tied)."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

    def head(self, h: jax.Array) -> jax.Array:
        """Normalised hidden [..., d_model] -> float32 logits [..., vocab].

        The losses call it on one sequence chunk at a time (train/losses.py `head_chunks`), on the
        hidden states `__call__(..., logits=False)` returns."""
        w = self.head_weight()
        with jax.named_scope("head"):
            logits = jnp.einsum("...d,dv->...v", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab")) if logits.ndim == 3 else logits

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 *, with_mtp: bool = False, return_hidden: bool = False, logits: bool = True,
                 routes: jax.Array | None = None, want_routes: bool = False) -> tuple[jax.Array, dict]:
        """Logits [B, S, vocab] (float32) and aux; with logits=False, the final normalised hidden
        state [B, S, d_model] instead (no [B, S, vocab] array: apply `head` chunk by chunk).

        tokens [B, S] int; positions [B, S] (default 0..S-1); segment_ids [B, S] (default all 1;
        0 marks padding, distinct ids mark packed documents). aux holds, for MoE models,
        `moe_load` [L_moe, E] assignments per expert over valid tokens, `balance_loss` [L_moe]
        (unweighted, V3 eq. 17) and `moe_rounds` [L_moe] (all-to-all dispatch rounds, int32); with
        `with_mtp`, `mtp_logits` [D, B, S, vocab] where depth k (1-based) at position i predicts
        token i + 1 + k, and `mtp_load` / `mtp_balance_loss`;
        with `return_hidden`, `hidden` [B, S, d_model], the final normalised hidden state. With
        logits=False and `with_mtp`, aux holds `mtp_hidden` [D, B, S, d_model] (each depth's
        normalised output, the input of the shared head) instead of `mtp_logits`.

        Routing replay (MoE): routes [B, S, L_moe, k] int are the experts each token selects in
        each MoE layer (e.g. those the sampler chose: sampling.generate(record_routes=True)); a
        token whose entries are -1 routes itself. Gate weights come from the current router, so it
        still learns. aux then holds `route_flips` and `route_replayed` [L_moe] (float32 counts:
        replayed valid tokens whose own top-k set differs; replayed valid tokens). want_routes: aux
        holds `routes` [B, S, L_moe, k] int32, the experts selected (MoE blocks of the main model).
        """
        cfg = self.cfg
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        if segment_ids is None:
            segment_ids = jnp.ones((b, s), jnp.int32)
        cos, sin = rope_cos_sin(positions, cfg)
        # rows may hold packed documents: no lengths (models/attention.py `attention`)
        ctx = {"cos": cos, "sin": sin, "segment_ids": segment_ids, "token_mask": segment_ids != 0}
        block_fn = lambda blk, h, _: blk(h, ctx)  # noqa: E731
        h = self.embed_tokens(tokens)
        aux: dict = {}
        if cfg.n_dense_layers:
            h, _ = scan_modules(self.dense_blocks, block_fn, h, remat=cfg.remat)
        if cfg.n_moe_layers:
            moe_ctx = dict(ctx, want_routes=want_routes)
            moe_fn = lambda blk, h, r: blk(h, dict(moe_ctx, routes=r))  # noqa: E731
            layer_routes = None if routes is None else jnp.moveaxis(routes, 2, 0)  # [L, B, S, k]: scanned
            h, moe_aux = scan_modules(self.moe_blocks, moe_fn, h, layer_routes, remat=cfg.remat)
            aux["moe_load"], aux["balance_loss"] = moe_aux["load"], moe_aux["balance_loss"]
            aux["moe_rounds"] = moe_aux["rounds"]
            if want_routes:
                aux["routes"] = jnp.moveaxis(moe_aux["experts"], 0, 2)
            if routes is not None:
                aux["route_flips"], aux["route_replayed"] = moe_aux["route_flips"], moe_aux["route_replayed"]
        h = self.final_norm(h)
        if return_hidden:
            aux["hidden"] = h
        if with_mtp and cfg.mtp_depth:
            aux.update(self._mtp(tokens, h, ctx, logits=logits))
        return (self.head(h) if logits else h), aux

    # ---- decoding with a fixed-size cache (see r1jax.sampling) ----

    def init_cache(self, batch: int, max_len: int) -> dict:
        """Zeros for every layer: MLA keeps c_kv [L, B, T, kv_lora] and k_rope [L, B, T, rope]
        (the compressed cache); GQA keeps k, v [L, B, T, K, head_dim]."""
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        if cfg.is_mla:
            shapes = {"c_kv": (batch, max_len, cfg.kv_lora_rank), "k_rope": (batch, max_len, cfg.qk_rope_head_dim)}
        else:
            shapes = {n: (batch, max_len, cfg.kv_heads, cfg.gqa_head_dim) for n in ("k", "v")}
        groups = {"dense_blocks": cfg.n_dense_layers, "moe_blocks": cfg.n_moe_layers}
        return {g: {k: jnp.zeros((n, *s), dt) for k, s in shapes.items()} for g, n in groups.items() if n}

    def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: dict, want_routes: bool = False):
        """Run right-padded prompts [B, P] (lengths [B]) through the model, filling cache[:, :, :P].

        Returns (logits of each row's last prompt token [B, vocab] float32, cache); with
        want_routes (a MoE model), also the experts each prompt token selected [B, P, L_moe, k]."""
        b, p = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
        cos, sin = rope_cos_sin(positions, self.cfg)
        # one right-padded prompt per row: `lengths` lets cuDNN take it (models/attention.py `attention`)
        ctx = {"cos": cos, "sin": sin, "segment_ids": segment_ids, "lengths": lengths.astype(jnp.int32),
               "token_mask": segment_ids != 0, "want_cache": True}
        h = self.embed_tokens(tokens)
        routes = None
        for group in cache:
            group_ctx = dict(ctx, want_routes=want_routes and group == "moe_blocks")
            h, aux = scan_modules(getattr(self, group), lambda blk, x, _: blk(x, group_ctx), h)
            cache = dict(cache, **{group: {k: jax.lax.dynamic_update_slice_in_dim(cache[group][k], v.astype(
                cache[group][k].dtype), 0, axis=2) for k, v in aux["cache"].items()}})
            if group_ctx["want_routes"]:
                routes = jnp.moveaxis(aux["experts"], 0, 2)  # [B, P, L, k]
        h = self.final_norm(jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1))
        return (self.head(h[:, 0]), cache, routes) if want_routes else (self.head(h[:, 0]), cache)

    def decode_step(self, tokens: jax.Array, pos: jax.Array, cache: dict, want_routes: bool = False):
        """Next-token logits [B, vocab] for tokens [B] at positions pos [B]; the cache gains them.
        With want_routes (a MoE model), also the experts each token selected [B, L_moe, k].

        Each group's stacked cache [L, B, T, ...] rides in the layer scan's carry and layer l writes
        its entries at [l, b, pos[b]]: XLA updates the one buffer in place (no per-step copy of the
        cache, which a scan emitting the layers' caches as outputs would make)."""
        cos, sin = rope_cos_sin(pos[:, None], self.cfg)
        h = self.embed_tokens(tokens[:, None])
        new_cache, routes = {}, None
        for group, group_cache in cache.items():
            record = want_routes and group == "moe_blocks"

            def step(blk, carry, layer):
                x, c = carry
                if record:
                    x, c, experts = blk.decode(x, cos, sin, c, pos, layer, want_routes=True)
                    return (x, c), experts[:, 0]
                return blk.decode(x, cos, sin, c, pos, layer), None
            n_layers = next(iter(group_cache.values())).shape[0]
            (h, new_cache[group]), ys = scan_modules(getattr(self, group), step, (h, group_cache),
                                                     jnp.arange(n_layers, dtype=jnp.int32))
            if record:
                routes = jnp.moveaxis(ys, 0, 1)  # [B, L, k]
        logits = self.head(self.final_norm(h)[:, 0])
        return (logits, new_cache, routes) if want_routes else (logits, new_cache)

    def _mtp(self, tokens: jax.Array, h: jax.Array, ctx: dict, logits: bool = True) -> dict:
        """The MTP depths on the main model's final normalised hidden h [B, S, d_model]: {"mtp_logits"
        [D, B, S, vocab]} (or {"mtp_hidden" [D, B, S, d_model]} with logits=False), + MoE loads."""
        d, (b, s) = self.cfg.mtp_depth, tokens.shape
        # Depth k reads the token k places ahead; past the end it reads 0 (its target is past the end too).
        shifted = jnp.stack([jnp.pad(tokens[:, k:], ((0, 0), (0, k))) for k in range(1, d + 1)])  # [D, B, S]
        emb = jax.vmap(self.embed_tokens)(shifted)  # [D, B, S, d_model]

        def step(module, h_prev, emb_k):
            h_k, aux_k = module(h_prev, emb_k, ctx)
            return h_k, (h_k, aux_k)

        with jax.named_scope("mtp"):
            _, (hidden, mtp_aux) = scan_modules(self.mtp, step, h, emb, remat=self.cfg.remat)
        if logits:
            out = {"mtp_logits": self.head(hidden.reshape(d * b, s, -1)).reshape(d, b, s, -1)}
        else:
            out = {"mtp_hidden": hidden}
        if self.cfg.is_moe:
            out["mtp_load"], out["mtp_balance_loss"] = mtp_aux["load"], mtp_aux["balance_loss"]
        return out


# --------------------------------------------------------------------------------------------------
# Functional entry points
# --------------------------------------------------------------------------------------------------


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model with ShapeDtypeStruct leaves: shapes, dtypes, logical axes; no memory."""
    return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))


def init_model(cfg: ModelConfig, rng: jax.Array, mesh=None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) with every parameter created directly in its sharding on `mesh`.

    The init runs under jit with out_shardings, so no device ever holds an unsharded copy of a
    parameter (the 671B preset included). Without a mesh it runs on the default device.
    """
    graphdef, abstract_state = nnx.split(abstract_model(cfg))

    def create(key):
        return nnx.split(Transformer(cfg, nnx.Rngs(key)))[1]

    if mesh is None:
        return graphdef, jax.jit(create)(rng)
    with jax.set_mesh(mesh):
        state = jax.jit(create, out_shardings=state_shardings(abstract_state, mesh))(rng)
    return graphdef, state


def forward(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, positions=None, segment_ids=None,
            with_mtp: bool = False, return_hidden: bool = False) -> tuple[jax.Array, dict]:
    """Pure forward for jit: merge the model from its state and run it."""
    return nnx.merge(graphdef, state)(tokens, positions, segment_ids, with_mtp=with_mtp, return_hidden=return_hidden)
