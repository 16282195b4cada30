"""Sharding on 8 fake CPU devices: logits equal the 1-device logits; experts live on the expert axis."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import r1jax.models.moe as moe
from conftest import CONFIGS
from r1jax.config import ConfigError, MeshConfig, load_config
from r1jax.models import forward, init_model
from r1jax.sharding import batch_sharding, logical_to_spec, make_mesh

MESHES = [dict(data=2, fsdp=2, expert=2, tensor=1), dict(data=1, fsdp=2, expert=2, tensor=2)]
fwd = jax.jit(forward, static_argnums=0, static_argnames="with_mtp")


@pytest.fixture(scope="module")
def tiny_v3():
    cfg = load_config(CONFIGS / "models" / "tiny_v3.yaml").model
    graphdef, state = init_model(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 24), 1, cfg.vocab_size)
    segments = jnp.ones_like(tokens).at[3, 17:].set(0).at[5, 10:].set(2)  # padding and a packed row
    ref = fwd(graphdef, state, tokens, None, segments, with_mtp=True)
    return cfg, tokens, segments, ref


def test_logical_rules_use_each_mesh_axis_once():
    sizes = {"data": 2, "fsdp": 2, "expert": 2, "tensor": 2}
    assert logical_to_spec(("experts", "embed", "mlp"), sizes, (8, 64, 32)) == P("expert", "fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed"), sizes, (512, 64)) == P("tensor", ("fsdp", "expert"))
    assert logical_to_spec(("batch", "length"), sizes, (8, 16)) == P(("data", "fsdp", "expert"), None)
    assert logical_to_spec(("embed",), sizes, (6,)) == P("fsdp")  # 6 is not divisible by fsdp*expert
    with pytest.raises(KeyError, match="not in r1jax.sharding.RULES"):
        logical_to_spec(("embd",), sizes, (8,))


def test_mesh_errors_name_the_axis(devices8):
    cfg = load_config(CONFIGS / "models" / "tiny_v3.yaml").model
    with pytest.raises(ConfigError, match="mesh"):
        make_mesh(MeshConfig(data=3, fsdp=-1), devices8, cfg)
    with pytest.raises(ConfigError, match=r"mesh\.tensor: tensor=8 does not divide model\.n_heads=4"):
        make_mesh(MeshConfig(data=1, fsdp=1, expert=1, tensor=8), devices8, cfg)


@pytest.mark.parametrize("sizes", MESHES, ids=["data2-fsdp2-expert2", "fsdp2-expert2-tensor2"])
def test_sharded_logits_equal_single_device(devices8, tiny_v3, sizes, monkeypatch):
    cfg, tokens, segments, (ref_logits, ref_aux) = tiny_v3
    calls = []
    orig = moe.routed_experts_sharded
    monkeypatch.setattr(moe, "routed_experts_sharded", lambda *a: calls.append(1) or orig(*a))
    mesh = make_mesh(MeshConfig(**sizes), devices8, cfg)
    graphdef, state = init_model(cfg, jax.random.key(0), mesh)
    flat = dict(nnx.to_flat_state(state))
    w = flat[("moe_blocks", "mlp", "w_gate")].get_value()  # [layers, experts, d, f]
    assert w.sharding.spec[1] == "expert"
    assert {s.data.shape[1] for s in w.addressable_shards} == {cfg.n_routed_experts // 2}
    emb = flat[("embed",)].get_value()
    assert all(s.data.size < emb.size for s in emb.addressable_shards)  # created sharded
    with jax.set_mesh(mesh):
        t = jax.device_put(tokens, batch_sharding(mesh))
        s = jax.device_put(segments, batch_sharding(mesh))
        logits, aux = fwd(graphdef, state, t, None, s, with_mtp=True)
        hlo = fwd.lower(graphdef, state, t, None, s, with_mtp=True).compile().as_text()
    assert calls, "the expert-parallel shard_map path was not used"
    assert "all-gather" in hlo
    valid = np.asarray(segments != 0)
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(ref_logits)[valid], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(aux["mtp_logits"])[:, valid], np.asarray(ref_aux["mtp_logits"])[:, valid],
                               atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(aux["moe_load"]), np.asarray(ref_aux["moe_load"]))
    np.testing.assert_allclose(np.asarray(aux["balance_loss"]), np.asarray(ref_aux["balance_loss"]), atol=1e-6)


def test_dense_student_tensor_parallel(devices8):
    cfg = load_config(CONFIGS / "models" / "tiny_qwen2.yaml").model
    graphdef, state = init_model(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 1, cfg.vocab_size)
    ref, _ = fwd(graphdef, state, tokens)
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2), devices8, cfg)
    graphdef, state = init_model(cfg, jax.random.key(0), mesh)
    wq = dict(nnx.to_flat_state(state))[("dense_blocks", "attn", "wq")].get_value()
    assert wq.sharding.spec[2] == "tensor"  # [layers, d, heads, head_dim]: heads split
    with jax.set_mesh(mesh):
        got, _ = fwd(graphdef, state, jax.device_put(tokens, batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sizes,dispatch", [(MESHES[1], "auto"), (dict(data=2, expert=4), "all_to_all")],
                         ids=["fsdp2-expert2-tensor2-gather", "data2-expert4-all_to_all"])
def test_sharded_gradients_equal_single_device(devices8, tiny_v3, sizes, dispatch):
    """Backward through the expert-parallel shard_map (all-gather / reduce-scatter transposes, or
    the all-to-all dispatch's custom VJP)."""
    cfg, tokens, segments, _ = tiny_v3
    cfg = dataclasses.replace(cfg, moe_dispatch=dispatch)

    def loss_fn(graphdef, params, others, t, s):
        logits, aux = nnx.merge(graphdef, params, others)(t, None, s, with_mtp=True)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, t[..., None], -1)[..., 0]
        return jnp.mean(nll) + 0.01 * aux["balance_loss"].sum() + 1e-3 * jnp.mean(aux["mtp_logits"] ** 2)

    def grads(mesh):
        graphdef, state = init_model(cfg, jax.random.key(0), mesh)
        graphdef, params, others = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)
        f = jax.jit(jax.value_and_grad(loss_fn, argnums=1), static_argnums=0)
        if mesh is None:
            return f(graphdef, params, others, tokens, segments)
        with jax.set_mesh(mesh):
            return f(graphdef, params, others, jax.device_put(tokens, batch_sharding(mesh)),
                     jax.device_put(segments, batch_sharding(mesh)))

    loss0, g0 = grads(None)
    loss1, g1 = grads(make_mesh(MeshConfig(**sizes), devices8, cfg))
    assert abs(float(loss0 - loss1)) < 1e-5
    for (path, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), atol=1e-6, rtol=0,
                                   err_msg="/".join(map(str, path)))
