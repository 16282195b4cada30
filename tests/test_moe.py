"""DeepSeekMoE routing, dropless experts and balance statistics against plain re-derivations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import CONFIGS
from r1jax.config import MeshConfig, load_config
from r1jax.models.moe import MoE, expert_load, route, routed_experts, sequence_balance_loss
from r1jax.sharding import batch_sharding, make_mesh


def v3_cfg(**kw):
    return dataclasses.replace(load_config(CONFIGS / "models" / "tiny_v3.yaml").model, **kw)


def np_route(x, kernel, bias, cfg):
    """Routing written from the DeepSeek-V3 (sigmoid, group top-2 sum) / V2 (softmax, group max) text."""
    logits = x.astype(np.float64) @ kernel.astype(np.float64)
    if cfg.score_func == "sigmoid":
        s = 1 / (1 + np.exp(-logits))
    else:
        s = np.exp(logits - logits.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
    out_e, out_w = [], []
    per = cfg.n_routed_experts // cfg.n_group
    for t in range(len(x)):
        choice = s[t] + bias
        groups = choice.reshape(cfg.n_group, per)
        gscore = np.sort(groups, -1)[:, -2:].sum(-1) if cfg.group_score == "top2_sum" else groups.max(-1)
        keep = np.argsort(-gscore)[:cfg.topk_group]
        allowed = [e for e in range(cfg.n_routed_experts) if e // per in keep]
        chosen = sorted(allowed, key=lambda e: -choice[e])[:cfg.num_experts_per_tok]
        w = s[t, chosen]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        out_e.append(chosen)
        out_w.append(w * cfg.routed_scaling_factor)
    return np.array(out_e), np.array(out_w), s


@pytest.mark.parametrize("variant", ["v3", "v2_grouped", "v2_greedy"])
def test_routing_matches_paper_formulas(variant):
    cfg = {"v3": v3_cfg(),
           "v2_grouped": v3_cfg(score_func="softmax", group_score="max", norm_topk_prob=False,
                                routed_scaling_factor=16.0, num_experts_per_tok=3),
           "v2_greedy": v3_cfg(score_func="softmax", n_group=1, topk_group=1, norm_topk_prob=False)}[variant]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, cfg.d_model)).astype(np.float32)
    kernel = rng.normal(size=(cfg.d_model, cfg.n_routed_experts)).astype(np.float32) * 0.3
    bias = rng.normal(size=cfg.n_routed_experts).astype(np.float32) * 0.1
    w, e, s = route(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), cfg)
    ref_e, ref_w, ref_s = np_route(x, kernel, bias, cfg)
    np.testing.assert_allclose(np.asarray(s), ref_s, rtol=1e-5, atol=1e-6)
    e, w = np.asarray(e), np.asarray(w)
    for t in range(len(x)):
        assert set(e[t]) == set(ref_e[t]), t
        got = dict(zip(e[t], w[t]))
        np.testing.assert_allclose([got[j] for j in ref_e[t]], ref_w[t], rtol=1e-5)


def test_correction_bias_selects_but_does_not_weight():
    cfg = v3_cfg(n_group=1, topk_group=1)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(16, cfg.d_model)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(cfg.d_model, 8)) * 0.3, jnp.float32)
    bias = jnp.zeros(8).at[3].set(10.0).at[6].set(10.0)
    w, e, s = route(x, kernel, bias, cfg)
    assert (np.sort(np.asarray(e), -1) == [3, 6]).all()
    s = np.asarray(s)
    expect = s[:, [3, 6]] / s[:, [3, 6]].sum(-1, keepdims=True) * cfg.routed_scaling_factor
    got = np.take_along_axis(np.asarray(w), np.argsort(np.asarray(e), -1), -1)
    np.testing.assert_allclose(got, expect, rtol=1e-5)


def naive_moe(x, experts, weights, wg, wu, wd):
    """Per-token loop: y_t = sum_j w_tj * FFN_{e_tj}(x_t)."""
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    y = np.zeros_like(x, dtype=np.float64)
    for t in range(len(x)):
        for e, w in zip(experts[t], weights[t]):
            h = silu(x[t] @ wg[e]) * (x[t] @ wu[e])
            y[t] += w * (h @ wd[e])
    return y


def moe_module(cfg, seed=0):
    module = MoE(cfg, nnx.Rngs(seed))
    params = [v for _, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)]
    for i, v in enumerate(params):
        v.set_value(jax.random.normal(jax.random.key(1000 * seed + i), v.get_value().shape) * 0.2)
    return module


def test_dropless_all_tokens_same_experts_equals_naive_loop():
    """Every token picks experts 2 and 5 (skewed bias): nothing is dropped, unlike capacity routing."""
    cfg = v3_cfg(n_shared_experts=0)
    module = moe_module(cfg)
    module.router_bias.set_value(jnp.zeros(8).at[2].set(50.0).at[5].set(50.0))
    x = jax.random.normal(jax.random.key(3), (4, 16, cfg.d_model))
    y, aux = module(x, jnp.ones((4, 16), bool))
    flat = np.asarray(x).reshape(-1, cfg.d_model)
    w, e, _ = route(jnp.asarray(flat), module.router.get_value(), module.router_bias.get_value(), cfg)
    assert (np.sort(np.asarray(e), -1) == [2, 5]).all()
    ref = naive_moe(flat, np.asarray(e), np.asarray(w), *(np.asarray(p.get_value(), np.float64)
                                                            for p in (module.w_gate, module.w_up, module.w_down)))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, cfg.d_model), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["load"]), np.eye(8)[[2, 5]].sum(0) * 64)


def test_dropless_expert_parallel_extreme_imbalance(devices8):
    """Same skew on 8 devices with experts split over 2 shards: one shard gets every assignment."""
    cfg = v3_cfg()
    module = moe_module(cfg)
    module.router_bias.set_value(jnp.zeros(8).at[1].set(50.0).at[3].set(50.0))  # both on expert shard 0
    x = jax.random.normal(jax.random.key(4), (8, 16, cfg.d_model))
    mask = jnp.ones((8, 16), bool)
    ref, _ = module(x, mask)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, expert=2, tensor=1), devices8, cfg)
    graphdef, state = nnx.split(module)
    with jax.set_mesh(mesh):
        y, _ = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m))(state, jax.device_put(x, batch_sharding(mesh, 3)),
                                                                     jax.device_put(mask, batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5, rtol=0)


def test_routed_experts_skips_foreign_experts():
    """With a slice of the experts (expert parallelism), other experts' assignments contribute 0."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(12, 8)).astype(np.float32)
    e = rng.integers(0, 6, size=(12, 2))
    w = rng.uniform(size=(12, 2)).astype(np.float32)
    wg, wu, wd = (rng.normal(size=s).astype(np.float32) for s in ((6, 8, 4), (6, 8, 4), (6, 4, 8)))
    part = routed_experts(jnp.asarray(x), jnp.asarray(e), jnp.asarray(w), wg[2:4], wu[2:4], wd[2:4], first_expert=2)
    keep = np.where((e >= 2) & (e < 4), w, 0.0)
    np.testing.assert_allclose(np.asarray(part), naive_moe(x, e, keep, wg, wu, wd), rtol=1e-4, atol=1e-5)


def test_no_dense_one_hot_over_experts():
    """The expert FFN is a grouped matmul: no dot_general touches an [E, ...] expert-stacked weight,
    and off TPU it is the tiled form (XLA lowers ragged_dot densely there)."""
    cfg = v3_cfg(n_shared_experts=0)
    module = moe_module(cfg)
    graphdef, state = nnx.split(module)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x, jnp.ones((2, 8), bool)))(
        state, jnp.ones((2, 8, cfg.d_model)))
    text = str(jaxpr)
    assert text.count("tiled_gmm") >= 3 if jax.default_backend() != "tpu" else text.count("ragged_dot") >= 3
    for eqn in jaxpr.jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes = [v.aval.shape for v in eqn.invars]
            assert not any(len(s) == 3 and s[0] == cfg.n_routed_experts for s in shapes), shapes


@pytest.mark.parametrize("sizes", [[5, 0, 130, 1, 40, 0], [0, 0, 0, 0, 0, 0], [200, 0, 0, 0, 0, 0], [33] * 6])
def test_tiled_gmm_matches_per_group_products(sizes):
    """Forward and both gradients against a per-group loop; rows past the groups give 0."""
    from r1jax.models.gmm import _layout, tiled_gmm

    rng = np.random.default_rng(sum(sizes))
    gs = np.array(sizes, np.int32)
    rows, d, f, tile = 210, 12, 10, 16
    x = rng.normal(size=(rows, d)).astype(np.float32)
    w = rng.normal(size=(6, d, f)).astype(np.float32)
    dy = rng.normal(size=(rows, f)).astype(np.float32)
    bounds = np.concatenate([[0], np.cumsum(gs)])
    ref_y, ref_dx, ref_dw = np.zeros((rows, f)), np.zeros((rows, d)), np.zeros((6, d, f))
    for g in range(6):
        s, e = bounds[g], bounds[g + 1]
        ref_y[s:e] = x[s:e] @ w[g]
        ref_dx[s:e] = dy[s:e] @ w[g].T
        ref_dw[g] = x[s:e].T @ dy[s:e]
    gsj = jnp.asarray(gs)
    np.testing.assert_allclose(np.asarray(tiled_gmm(jnp.asarray(x), jnp.asarray(w), gsj, tile)), ref_y, atol=1e-4)
    dx, dw = jax.grad(lambda a, b: jnp.sum(tiled_gmm(a, b, gsj, tile) * dy), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(dx), ref_dx, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, atol=1e-4)
    # work is bounded by the routed rows plus less than one tile of padding per group
    _, _, used, _ = _layout(gsj, rows, tile)
    assert int(used.sum()) * tile <= gs.sum() + 6 * tile


def test_balance_loss_and_load_match_v3_formula():
    rng = np.random.default_rng(6)
    b, s, n, k = 3, 10, 8, 2
    scores = rng.uniform(0.05, 1.0, size=(b, s, n)).astype(np.float32)
    experts = np.stack([[rng.choice(n, k, replace=False) for _ in range(s)] for _ in range(b)])
    mask = np.ones((b, s), bool)
    mask[1, 6:] = False
    mask[2, :] = False  # a row of pure padding does not count as a sequence
    ref = []
    for i in range(b):
        valid = np.where(mask[i])[0]
        if not len(valid):
            continue
        t = len(valid)
        f = np.array([n / (k * t) * sum(j in experts[i, tt] for tt in valid) for j in range(n)])
        p = np.array([sum(scores[i, tt, j] / scores[i, tt].sum() for tt in valid) / t for j in range(n)])
        ref.append((f * p).sum())
    got = sequence_balance_loss(jnp.asarray(scores), jnp.asarray(experts), jnp.asarray(mask), k)
    np.testing.assert_allclose(float(got), np.mean(ref), rtol=1e-5)
    load = expert_load(jnp.asarray(experts), jnp.asarray(mask), n)
    np.testing.assert_array_equal(np.asarray(load), np.bincount(experts[mask].reshape(-1), minlength=n))
    # perfectly balanced routing with uniform scores gives the minimum, 1.0
    uni = np.full((1, 8, 4), 0.25, np.float32)
    bal = np.array([[[0, 1], [2, 3]] * 4])
    assert abs(float(sequence_balance_loss(jnp.asarray(uni), jnp.asarray(bal), jnp.ones((1, 8), bool), 2)) - 1.0) < 1e-6


def test_tile_height_follows_rows_per_expert():
    from r1jax.models.gmm import tile_rows

    # decode: 16 tokens x top-2 over 8 experts = ~4 rows per expert -> the smallest tile, not 128
    assert tile_rows(32, 8) == 8
    assert tile_rows(100, 8) == 16  # 12 rows per expert -> next power of two
    assert tile_rows(16 * 256 * 2, 8) == 128  # a training batch: full height
    assert tile_rows(3, 64) == 8


def _per_group(x, w, gs, dy):
    bounds = np.concatenate([[0], np.cumsum(gs)])
    y, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros(x.shape), np.zeros(w.shape)
    for g in range(len(gs)):
        s, e = bounds[g], bounds[g + 1]
        y[s:e], dx[s:e], dw[g] = x[s:e] @ w[g], dy[s:e] @ w[g].T, x[s:e].T @ dy[s:e]
    return y, dx, dw


@pytest.mark.parametrize("sizes", [[5, 0, 130, 1, 40, 0], [0, 0, 0, 0, 0, 0], [33] * 6])
def test_mosaic_gmm_custom_vjp_matches_per_group_products(sizes):
    """The Hopper grouped matmul's custom VJP (models/gmm.py mosaic_gmm) run with kernels of the
    same contracts (XLA ragged_dot): forward and both gradients against a per-group loop, rows past
    the groups 0 (the Mosaic kernels leave them unwritten: the VJP must mask them)."""
    from r1jax.models.gmm import REFERENCE_KERNELS, mosaic_gmm

    rng = np.random.default_rng(len(sizes) + sum(sizes))
    gs = np.array(sizes, np.int32)
    x = rng.normal(size=(210, 12)).astype(np.float32)
    w = rng.normal(size=(6, 12, 10)).astype(np.float32)
    dy = rng.normal(size=(210, 10)).astype(np.float32)
    ref_y, ref_dx, ref_dw = _per_group(x, w, gs, dy)

    def garbage_past_groups(lhs, rhs, group_sizes, transpose_rhs=False):  # what unwritten rows may hold
        y = REFERENCE_KERNELS[0](lhs, rhs, group_sizes, transpose_rhs)
        return jnp.where(jnp.arange(y.shape[0])[:, None] < jnp.sum(group_sizes), y, jnp.nan)

    kernels = (garbage_past_groups, REFERENCE_KERNELS[1])
    gsj = jnp.asarray(gs)
    y = mosaic_gmm(jnp.asarray(x), jnp.asarray(w), gsj, kernels)
    np.testing.assert_allclose(np.asarray(y), ref_y, atol=1e-4)
    dx, dw = jax.grad(lambda a, b: jnp.sum(mosaic_gmm(a, b, gsj, kernels) * dy), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(dx), ref_dx, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, atol=1e-4)


def test_mosaic_gmm_lowers_for_gpu(monkeypatch):
    """The Hopper path (impl="mosaic_gpu") lowers for CUDA from this CPU machine, forward and
    backward, as Mosaic-GPU kernels: the y / dx kernel twice and the dw kernel once."""
    import re
    import types

    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    from r1jax.models.gmm import grouped_matmul, mosaic_fits

    # the dw kernel sizes its grid by the GPU's SM count (jax.devices()[0].core_count); lowering
    # here, with no GPU, it is given an H100 / H200's 132
    hopper = types.SimpleNamespace(core_count=132)
    proxy = types.SimpleNamespace(**{k: getattr(jax, k) for k in dir(jax) if not k.startswith("__")})
    proxy.devices = lambda *a: [hopper]
    monkeypatch.setattr(transposed_ragged_dot_mgpu, "jax", proxy)

    rows, d, f, e = 512, 256, 128, 4
    assert mosaic_fits(d, f) and not mosaic_fits(128, 96)  # tiny_v3's d_model / moe_d_ff fall back to tiled
    args = (jax.ShapeDtypeStruct((rows, d), jnp.bfloat16), jax.ShapeDtypeStruct((e, d, f), jnp.bfloat16),
            jax.ShapeDtypeStruct((e,), jnp.int32))

    def loss(x, w, gs):
        return jnp.sum(grouped_matmul(x, w, gs, "mosaic_gpu").astype(jnp.float32) ** 2)

    exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=["cuda"])(*args)
    calls = re.findall(r"stablehlo\.custom_call @(\w+)", exported.mlir_module())
    assert calls.count("mosaic_gpu") + calls.count("mosaic_gpu_v2") >= 3, calls
    assert "ragged_dot" not in " ".join(calls)


@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()),
                    reason="needs a GPU (Hopper): the Mosaic-GPU kernels against the tiled form")
def test_mosaic_gmm_equals_tiled_on_gpu():
    from r1jax.models.gmm import grouped_matmul

    rng = np.random.default_rng(0)
    gs = jnp.asarray([300, 0, 129, 83], jnp.int32)
    x = jnp.asarray(rng.normal(size=(640, 256)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(4, 256, 128)) * 0.05, jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(640, 128)), jnp.bfloat16)
    out = {}
    for impl in ("mosaic_gpu", "tiled"):
        f = jax.jit(lambda a, b, i=impl: jnp.sum(grouped_matmul(a, b, gs, i).astype(jnp.float32) * dy))
        out[impl] = (grouped_matmul(x, w, gs, impl), *jax.grad(f, argnums=(0, 1))(x, w))
    for a, b in zip(out["mosaic_gpu"], out["tiled"]):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2)
