"""Routing replay for MoE RL (issue 14 item 5): the sampler records the experts each token selected
per MoE layer, and a training forward handed those routes selects exactly them, with gate weights
from the current router. Checked against plain re-derivations of the routing formulas, and on a
tiny V3 in bfloat16 whose router margins are small enough that, without replay, the training
forward selects differently from the sampler for some tokens."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import CONFIGS
from r1jax.config import load_config
from r1jax.models import init_model
from r1jax.models.moe import route
from r1jax.sampling import generate, pad_prompts
from r1jax.stages.grpo import sampler_logp_rows
from r1jax.train.grpo import pack_plan, packed_rows, rollout_batch
from r1jax.train.losses import sampled_logprobs
from test_moe import np_route, v3_cfg


def test_forced_routes_are_selected_and_their_gates_recomputed():
    cfg = v3_cfg()
    rng = np.random.default_rng(0)
    t, e, k = 48, cfg.n_routed_experts, cfg.num_experts_per_tok
    x = rng.normal(size=(t, cfg.d_model)).astype(np.float32)
    kernel = (rng.normal(size=(cfg.d_model, e)) * 0.3).astype(np.float32)
    bias = (rng.normal(size=e) * 0.1).astype(np.float32)
    forced = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int8)
    forced[::3] = -1  # these tokens were not recorded: they route themselves
    w, got, _ = route(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), cfg, forced=jnp.asarray(forced))
    own, own_w, s = np_route(x, kernel, bias, cfg)
    got, w = np.asarray(got), np.asarray(w)
    for i in range(t):
        if forced[i, 0] < 0:
            assert sorted(got[i]) == sorted(own[i])
            np.testing.assert_allclose(sorted(w[i]), sorted(own_w[i]), rtol=1e-5)
        else:
            np.testing.assert_array_equal(got[i], forced[i])
            plain = s[i, forced[i]] / s[i, forced[i]].sum() * cfg.routed_scaling_factor  # V3 eqs. 12-13
            np.testing.assert_allclose(w[i], plain, rtol=1e-5)

    # The router still learns under replay: the gates' gradient w.r.t. the router kernel is the
    # gradient of the plain formula (sigmoid scores of the forced experts, normalised, scaled).
    c = jnp.asarray(rng.normal(size=(t, k)).astype(np.float32))
    rows = forced[:, 0] >= 0

    def via_route(kern):
        return jnp.sum(c[rows] * route(jnp.asarray(x), kern, jnp.asarray(bias), cfg, forced=jnp.asarray(forced))[0][rows])

    def plain(kern):
        sc = jax.nn.sigmoid(jnp.asarray(x) @ kern)
        g = jnp.take_along_axis(sc, jnp.asarray(forced, jnp.int32).clip(0), -1)
        return jnp.sum(c[rows] * (g / g.sum(-1, keepdims=True) * cfg.routed_scaling_factor)[rows])

    g1, g2 = jax.grad(via_route)(jnp.asarray(kernel)), jax.grad(plain)(jnp.asarray(kernel))
    assert float(jnp.abs(g2).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-4, atol=1e-6)


@functools.cache
def _model(dtype: str):
    cfg = dataclasses.replace(load_config(CONFIGS / "models" / "tiny_v3.yaml").model, dtype=dtype, mtp_depth=0)
    graphdef, state = init_model(cfg, jax.random.key(0))
    state = jax.tree.map(lambda a: a * 3 if a.ndim >= 2 else a, state)  # peaked, varied predictions
    return cfg, graphdef, state


def _rollouts(cfg, graphdef, state, g=2, new=24):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, cfg.vocab_size, n).astype(np.int32) for n in (5, 11, 2, 8, 7, 3)]
    toks, lens = pad_prompts(prompts, 40, 0)
    out = generate(graphdef, state, toks, lens, jax.random.key(0), max_new_tokens=new, eos_id=-1, temperature=1.0,
                   samples_per_prompt=g, record_routes=True)
    return out, np.repeat(lens, g)


def _forward(graphdef, state, tokens, lengths, routes=None):
    seg = (np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    fn = jax.jit(lambda t, s, r: nnx.merge(graphdef, state)(t, None, s, routes=r, want_routes=True))
    return fn(tokens, jnp.asarray(seg), routes)


def _differ(a, b):
    """[N, T, L] True where two [N, T, L, k] selections are different sets of experts."""
    return np.any(np.sort(a, -1) != np.sort(b, -1), -1)


def test_sampler_records_the_routes_of_every_token_it_fed():
    cfg, graphdef, state = _model("float32")
    out, plens = _rollouts(cfg, graphdef, state)
    routes, lengths = np.asarray(out["routes"]), np.asarray(out["lengths"])
    n, t = out["tokens"].shape
    assert routes.shape == (n, t, cfg.n_moe_layers, cfg.num_experts_per_tok) and routes.dtype == np.int8
    fed = np.arange(t)[None] < lengths[:, None] - 1  # prompt tokens (prefill) and every new token but the last
    np.testing.assert_array_equal(routes[..., 0] >= 0, np.broadcast_to(fed[..., None], routes.shape[:3]))
    assert routes.max() < cfg.n_routed_experts
    # the two samples of a prompt share its prefill, so its prompt routes
    np.testing.assert_array_equal(routes[0, :plens[0]], routes[1, :plens[0]])
    # in float32 the sampler's path (absorbed MLA decode over the cache) selects what the training forward selects
    _, aux = _forward(graphdef, state, out["tokens"], lengths)
    assert not _differ(np.asarray(aux["routes"]), routes)[fed].any()


def test_replay_makes_the_training_forward_select_the_sampler_experts():
    """bfloat16 compute: the decode path and the training forward round differently, and the tiny
    router's margins between experts are small enough that some selections flip."""
    cfg, graphdef, state = _model("bfloat16")
    state = jax.tree.map(lambda a: a, state)  # a copy: the cached model stays as it is
    r = state["moe_blocks"]["mlp"]["router"]
    w = r.get_value()
    r.set_value(w.mean(-1, keepdims=True) + 0.2 * (w - w.mean(-1, keepdims=True)))  # 5x smaller margins
    out, plens = _rollouts(cfg, graphdef, state)
    routes, lengths, tokens = np.asarray(out["routes"]), np.asarray(out["lengths"]), out["tokens"]
    fed = np.broadcast_to((np.arange(tokens.shape[1])[None] < lengths[:, None] - 1)[..., None], routes.shape[:3])

    _, free = _forward(graphdef, state, tokens, lengths)
    flips = _differ(np.asarray(free["routes"]), routes) & fed
    assert flips.sum() > 0, "the test needs a router whose selections differ without replay"

    _, replayed = _forward(graphdef, state, tokens, lengths, jnp.asarray(routes))
    np.testing.assert_array_equal(np.asarray(replayed["routes"])[fed], routes[fed].astype(np.int32))
    # the forward counts the replayed selections its own router would have made differently
    assert float(np.sum(replayed["route_replayed"])) == fed.sum()
    assert float(np.sum(replayed["route_flips"])) > 0

    # and the training log-probs come closer to what the sampler drew with
    rows = rollout_batch(tokens, jnp.asarray(plens), out["lengths"])
    placed, mask = sampler_logp_rows(out["logprobs"], jnp.asarray(plens), out["num_new"], tokens.shape[1])

    def gap(rts):
        logits, _ = nnx.merge(graphdef, state)(rows["tokens"], rows["positions"], rows["segment_ids"], routes=rts)
        d = jnp.abs(sampled_logprobs(logits, rows["targets"])[0] - placed) * mask
        return float(d.max()), float(d.sum() / mask.sum())

    (max_free, mean_free), (max_replay, mean_replay) = gap(None), gap(jnp.asarray(routes))
    assert max_replay < max_free and mean_replay < mean_free, (max_free, max_replay, mean_free, mean_replay)


def test_packed_passes_carry_each_rollout_routes():
    rng = np.random.default_rng(2)
    n, t, layers, k = 8, 16, 3, 2
    lengths = rng.integers(3, 9, n)
    routes = np.where((np.arange(t)[None] < lengths[:, None] - 1)[..., None, None],
                      rng.integers(0, 8, (n, t, layers, k)), -1).astype(np.int8)
    toks = rng.integers(1, 50, (n, t)).astype(np.int32)
    rows = dict(rollout_batch(jnp.asarray(toks), jnp.asarray(np.ones(n, np.int32)), jnp.asarray(lengths)),
                routes=jnp.asarray(routes))
    plan = pack_plan(lengths, t, 2)
    assert plan is not None and len(plan["src"]) < n
    packed = np.asarray(packed_rows(rows, {key: jnp.asarray(v) for key, v in plan.items()})["routes"])
    for r in range(len(plan["src"])):
        for o in range(t):
            src = plan["src"][r, o]
            want = routes.reshape(n * t, layers, k)[src] if src >= 0 else np.full((layers, k), -1)
            np.testing.assert_array_equal(packed[r, o], want)


def test_dry_run_states_the_routes_memory():
    """The plan's "recorded routes" item is the bytes per device of the routes a GRPO rollout of
    that config returns (one device here: the whole array)."""
    from r1jax.dryrun import plan_memory

    cfg = load_config(CONFIGS / "models" / "tiny_v3.yaml",
                      ["grpo.routing_replay=rollout", "grpo.group_size=2", "grpo.prompts_per_step=6",
                       "train.seq_len=40", "sampling.max_new_tokens=24", "mesh.fsdp=1"])
    plan = plan_memory(cfg, "grpo", devices=1)
    items = [it for ph in plan.phases for it in ph.items if it.name == "recorded routes"]
    assert len(items) == 3  # rollout, log-prob pass, updates
    model_cfg, graphdef, state = _model("float32")
    out, _ = _rollouts(model_cfg, graphdef, state, g=2, new=24)
    assert all(it.bytes == out["routes"].nbytes for it in items)
    off = plan_memory(load_config(CONFIGS / "models" / "tiny_v3.yaml", ["mesh.fsdp=1"]), "grpo", devices=1)
    assert not [it for ph in off.phases for it in ph.items if it.name == "recorded routes"]


def test_replay_on_a_dense_model_is_one_clear_error():
    from r1jax.config import ConfigError
    from r1jax.stages.grpo import run_grpo

    cfg = load_config(CONFIGS / "models" / "tiny_qwen2.yaml", ["grpo.routing_replay=rollout"])
    with pytest.raises(ConfigError, match="grpo.routing_replay"):
        run_grpo(cfg)
