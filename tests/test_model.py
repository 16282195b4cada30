"""Decoder behaviour beyond logits parity: packing, MTP wiring, gradients, bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import CONFIGS
from r1jax.config import load_config
from r1jax.models import forward, init_model
from r1jax.models.layers import rope_cos_sin

fwd = jax.jit(forward, static_argnums=0, static_argnames=("with_mtp", "return_hidden"))


@functools.cache
def initialised(name):
    cfg = load_config(CONFIGS / "models" / f"{name}.yaml").model
    graphdef, state = init_model(cfg, jax.random.key(0))
    return cfg, graphdef, state


@pytest.fixture(scope="module", params=["tiny_v3", "tiny_llama3"])
def model(request):
    return initialised(request.param)


def test_packed_documents_equal_separate_runs(model):
    """Two documents packed in one row (segment ids 1, 2; positions restart) give the logits each
    document gets alone: no attention across documents."""
    cfg, graphdef, state = model
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, cfg.vocab_size, 9), rng.integers(1, cfg.vocab_size, 6)
    packed = np.concatenate([a, b, [0]])[None]
    seg = np.array([[1] * 9 + [2] * 6 + [0]])
    pos = np.array([list(range(9)) + list(range(6)) + [0]])
    got, _ = fwd(graphdef, state, packed, pos, seg)
    alone_a, _ = fwd(graphdef, state, a[None])
    alone_b, _ = fwd(graphdef, state, b[None])
    np.testing.assert_allclose(np.asarray(got)[0, :9], np.asarray(alone_a)[0], atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(got)[0, 9:15], np.asarray(alone_b)[0], atol=2e-5, rtol=0)
    assert np.isfinite(np.asarray(got)).all()  # the padding position stays finite


def test_gradients_reach_every_parameter(model):
    cfg, graphdef, state = model
    params = nnx.state(nnx.merge(graphdef, state), nnx.Param)
    others = nnx.state(nnx.merge(graphdef, state), nnx.Not(nnx.Param))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 1, cfg.vocab_size)

    def loss(p):
        logits, aux = nnx.merge(graphdef, p, others)(tokens, with_mtp=True)
        extra = sum(jnp.sum(v ** 2) for k, v in aux.items() if k == "mtp_logits")
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + 1e-3 * extra

    grads = jax.jit(jax.grad(loss))(params)
    for path, g in nnx.to_flat_state(grads):
        arr = np.asarray(g.get_value())
        assert np.isfinite(arr).all(), path
        assert np.abs(arr).max() > 0, f"no gradient reaches {'/'.join(map(str, path))}"


def test_mtp_matches_its_definition():
    """Depth-1 MTP logits re-derived from its parts: head(norm(block(W [enorm(Emb(t_{i+1})); hnorm(h_i)])))."""
    cfg, graphdef, state = initialised("tiny_v3")
    tokens = jax.random.randint(jax.random.key(4), (2, 10), 1, cfg.vocab_size)
    _, aux = fwd(graphdef, state, tokens, with_mtp=True, return_hidden=True)

    @jax.jit
    def by_definition(state, tokens, hidden):
        model = nnx.merge(graphdef, state)
        mtp_graph, mtp_state = nnx.split(model.mtp)
        module = nnx.merge(mtp_graph, jax.tree.map(lambda x: x[0], mtp_state))  # depth 1 of the stack
        nxt = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
        emb = model.embed.get_value()[nxt]
        x = jnp.concatenate([module.enorm(emb), module.hnorm(hidden)], -1) @ module.eh_proj.get_value()
        cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(10), (2, 10)), cfg)
        seg = jnp.ones((2, 10), jnp.int32)
        h, _ = module.block(x, {"cos": cos, "sin": sin, "segment_ids": seg, "token_mask": seg != 0})
        return module.norm(h) @ model.lm_head.get_value()

    expect = by_definition(state, tokens, aux["hidden"])
    np.testing.assert_allclose(np.asarray(aux["mtp_logits"][0]), np.asarray(expect), atol=1e-5, rtol=1e-5)
    # causality: depth-1 logits at position i see tokens up to i + 1 only
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % cfg.vocab_size)
    _, aux2 = fwd(graphdef, state, changed, with_mtp=True)
    diff = np.abs(np.asarray(aux2["mtp_logits"][0] - aux["mtp_logits"][0])).max(-1)
    assert (diff[:, :6] == 0).all() and (diff[:, 6] > 0).all()


def test_bfloat16_compute_close_to_float32():
    cfg, graphdef, state = initialised("tiny_v3")
    cfg16 = load_config(CONFIGS / "models" / "tiny_v3.yaml", ["model.dtype=bfloat16"]).model
    graphdef16, _ = nnx.split(nnx.eval_shape(lambda: __import__("r1jax").models.Transformer(cfg16, nnx.Rngs(0))))
    tokens = jax.random.randint(jax.random.key(6), (2, 16), 1, cfg.vocab_size)
    ref, _ = fwd(graphdef, state, tokens)
    got, _ = fwd(graphdef16, state, tokens)
    assert got.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert rel < 3e-2, rel


def _scopes(lowered) -> set[str]:
    """Every name_scope component in a lowered program's op locations (the lowered text, not the
    compiled one: an executable read back from the compilation cache carries no op names)."""
    import re

    text = lowered.as_text(debug_info=True)
    return {part for loc in re.findall(r'loc\("([^"]*)"', text) for part in loc.split("/")}


def test_profiles_name_the_parts_of_the_model():
    """jax.named_scope on attention, the MoE's routing / dispatch / experts / combine, the dense MLP,
    the output head and MTP: a profile (or the compiled program) reads like the code."""
    cfg, graphdef, state = initialised("tiny_v3")
    lowered = fwd.lower(graphdef, state, jnp.ones((2, 10), jnp.int32), with_mtp=True)
    want = {"attention", "moe", "routing", "dispatch", "experts", "combine", "mlp", "head", "mtp"}
    assert want <= _scopes(lowered), want - _scopes(lowered)
