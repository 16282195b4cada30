"""The SFT update function: sharding, accumulation, packing, masks, MTP, router-bias balancing, optimizer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import CONFIGS
from r1jax.config import MeshConfig, load_config
from r1jax.data.pipeline import PadToRow, rows_from_packed
from r1jax.models import forward
from r1jax.sharding import batch_sharding, make_mesh
from r1jax.train.losses import mtp_targets, per_token_cross_entropy
from r1jax.train.sft import sft_step
from r1jax.train.state import (decay_mask, init_train_state, learning_rate_schedule, make_context,
                               train_state_shardings)


def cfg_of(*overrides):
    return load_config(CONFIGS / "models" / "tiny_v3.yaml",
                       ["train.batch_size=8", "train.seq_len=32", "optimizer.lr=1e-2", "optimizer.warmup_steps=0",
                        "train.steps=100", "model.n_layers=2", *overrides])


def packed_batch(rng, b, s, vocab):
    """Rows of two or three documents each, trailing padding, random completion masks."""
    tokens = rng.integers(1, vocab, (b, s)).astype(np.int32)
    seg = np.zeros((b, s), np.int32)
    pos = np.zeros((b, s), np.int32)
    for r in range(b):
        cuts = sorted(rng.choice(np.arange(4, s - 4), size=2, replace=False))
        bounds = [0, cuts[0], cuts[1], s - rng.integers(0, 4)]
        for d in range(3):
            seg[r, bounds[d]:bounds[d + 1]] = d + 1
            pos[r, bounds[d]:bounds[d + 1]] = np.arange(bounds[d + 1] - bounds[d])
    ex = {"inputs": tokens, "loss_mask": rng.random((b, s)) < 0.7, "inputs_segment_ids": seg, "inputs_positions": pos}
    rows = [rows_from_packed({k: v[r] for k, v in ex.items()}) for r in range(b)]
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def run_steps(cfg, batches, mesh=None):
    ctx = make_context(cfg)
    state = init_train_state(ctx, jax.random.key(0), mesh)
    losses = []
    if mesh is None:
        step = jax.jit(functools.partial(sft_step, ctx=ctx), donate_argnums=0)
        for i, b in enumerate(batches):
            state, m = step(state, b, jax.random.key(i))
            losses.append(float(m["loss"]))
        return state, losses
    sh = train_state_shardings(ctx, mesh)
    step = jax.jit(functools.partial(sft_step, ctx=ctx), donate_argnums=0,
                   in_shardings=(sh, batch_sharding(mesh), None), out_shardings=(sh, None))
    with jax.set_mesh(mesh):
        for i, b in enumerate(batches):
            b = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in b.items()}
            state, m = step(state, b, jax.random.key(i))
            losses.append(float(m["loss"]))
    return state, losses


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)] + [np.asarray(x) for x in
                                                                    jax.tree.leaves(state.router_bias)]


def test_three_steps_sharded_equal_single_device(devices8):
    # lr 1e-4: Adam's first steps are close to sign(g) * lr, so at large lr the ~1e-7 differences that
    # sharded reductions make in near-zero gradients would show up as lr-sized parameter differences.
    cfg = cfg_of("train.bias_update_speed=0.01", "optimizer.lr=1e-4")
    rng = np.random.default_rng(0)
    batches = [packed_batch(rng, 8, 32, cfg.model.vocab_size) for _ in range(3)]
    ref_state, ref_losses = run_steps(cfg, batches)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, expert=2, tensor=1), devices8, cfg.model)
    state, losses = run_steps(cfg, batches, mesh)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    for a, b in zip(leaves(ref_state), leaves(state)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    moved = max(np.abs(a - b).max() for a, b in zip(leaves(ref_state), leaves(init_train_state(make_context(cfg),
                                                                                             jax.random.key(0)))))
    assert moved > 2e-4  # the params did change, far more than the tolerance


def test_grad_accumulation_equals_one_big_batch():
    rng = np.random.default_rng(1)
    batches = [packed_batch(rng, 8, 32, 512) for _ in range(2)]
    s1, l1 = run_steps(cfg_of("train.grad_accum=1", "optimizer.lr=1e-4"), batches)
    s4, l4 = run_steps(cfg_of("train.grad_accum=4", "optimizer.lr=1e-4"), batches)
    # the losses (about 6.2) to a few float32 ulps: four microbatch sums are added in another order
    np.testing.assert_allclose(l4, l1, atol=1e-6, rtol=1e-6)
    for a, b in zip(leaves(s1), leaves(s4)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_loss_counts_only_completion_tokens():
    cfg = cfg_of("train.mtp=false")
    ctx = make_context(cfg)
    state = init_train_state(ctx, jax.random.key(0))
    batch = packed_batch(np.random.default_rng(2), 8, 32, 512)
    step = jax.jit(functools.partial(sft_step, ctx=ctx))
    _, m1 = step(state, batch, jax.random.key(0))
    other = dict(batch, targets=np.where(batch["loss_mask"] > 0, batch["targets"], 7))  # change untrained targets
    _, m2 = step(state, other, jax.random.key(0))
    assert float(m1["loss"]) == float(m2["loss"]) and float(m1["tokens"]) == batch["loss_mask"].sum()
    # and the loss is the plain mean cross-entropy over trained tokens (computed here from the logits)
    merged = nnx.merge_state(state.params, state.router_bias)
    logits, _ = forward(ctx.graphdef, merged, batch["tokens"], batch["positions"], batch["segment_ids"])
    ce = np.asarray(per_token_cross_entropy(logits, batch["targets"]))
    np.testing.assert_allclose(float(m1["loss"]), (ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum(),
                               rtol=1e-5)


def test_packed_document_losses_equal_unpacked():
    """Per-document summed losses of a packed row equal those of the documents in rows of their own."""
    cfg = cfg_of()
    ctx = make_context(cfg)
    state = init_train_state(ctx, jax.random.key(3))
    merged = nnx.merge_state(state.params, state.router_bias)
    rng = np.random.default_rng(4)
    docs = [{"inputs": rng.integers(1, 512, n).astype(np.int32), "loss_mask": rng.random(n) < 0.6} for n in (9, 13, 7)]
    s = 32
    packed = {"inputs": np.zeros(s, np.int32), "loss_mask": np.zeros(s, bool), "inputs_segment_ids": np.zeros(s, np.int32),
              "inputs_positions": np.zeros(s, np.int32)}
    at = 0
    for i, d in enumerate(docs):
        n = len(d["inputs"])
        packed["inputs"][at:at + n], packed["loss_mask"][at:at + n] = d["inputs"], d["loss_mask"]
        packed["inputs_segment_ids"][at:at + n], packed["inputs_positions"][at:at + n] = i + 1, np.arange(n)
        at += n
    rows = [rows_from_packed(packed)] + [rows_from_packed(PadToRow(s).map(d)) for d in docs]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    logits, _ = forward(ctx.graphdef, merged, batch["tokens"], batch["positions"], batch["segment_ids"])
    loss = np.asarray(per_token_cross_entropy(logits, batch["targets"])) * batch["loss_mask"]
    for i in range(3):
        in_packed = loss[0][batch["segment_ids"][0] == i + 1].sum()
        alone = loss[1 + i].sum()
        assert abs(in_packed - alone) < 1e-4 * max(1.0, alone), (i, in_packed, alone)
        assert batch["loss_mask"][1 + i].sum() == batch["loss_mask"][0][batch["segment_ids"][0] == i + 1].sum()


def test_mtp_targets_follow_eq_24():
    targets = np.array([[11, 12, 13, 14, 15, 16]])  # tokens 1..6 of a row, token t_{i+1} at i
    mask = np.array([[1, 1, 0, 1, 1, 0]])
    seg = np.array([[1, 1, 1, 1, 2, 2]])
    t, m = mtp_targets(jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(seg), depth=2)
    # depth 1 at i predicts t_{i+2} = targets[i+1]; depth 2 predicts targets[i+2]; same document only
    np.testing.assert_array_equal(np.asarray(t)[0, 0, :5], [12, 13, 14, 15, 16])
    np.testing.assert_array_equal(np.asarray(m)[0, 0], [True, False, True, False, False, False])
    np.testing.assert_array_equal(np.asarray(t)[1, 0, :4], [13, 14, 15, 16])
    np.testing.assert_array_equal(np.asarray(m)[1, 0], [False, True, False, False, False, False])


def skewed(state, experts=(0, 1), push=0.3):
    """Make every MoE layer select `experts` for nearly every token: correction biases far above the
    spread of the sigmoid scores (about +-0.05 at init)."""
    def bump(path, v):
        return v.replace(v.get_value().at[..., list(experts)].add(push))
    return state.replace(router_bias=nnx.map_state(bump, state.router_bias))


def test_bias_update_balances_a_skewed_router():
    cfg = cfg_of("optimizer.lr=0", "train.bias_update_speed=0.02", "model.n_group=1", "model.topk_group=1")
    ctx = make_context(cfg)
    state = skewed(init_train_state(ctx, jax.random.key(0)))
    step = jax.jit(functools.partial(sft_step, ctx=ctx))
    rng = np.random.default_rng(5)
    spreads = []
    for i in range(40):
        state, m = step(state, packed_batch(rng, 8, 32, 512), jax.random.key(i))
        spreads.append(float(m["load_max_over_mean"]))
    assert spreads[0] > 3.0, spreads[0]  # the top-2 of 8 experts take nearly everything at first
    assert np.mean(spreads[-5:]) < 0.5 * spreads[0], spreads


def test_without_gamma_biases_do_not_move_and_get_no_gradient():
    cfg = cfg_of("train.bias_update_speed=0")
    ctx = make_context(cfg)
    state = skewed(init_train_state(ctx, jax.random.key(0)))
    before = [np.asarray(x).copy() for x in jax.tree.leaves(state.router_bias)]
    params_before = [np.asarray(x).copy() for x in jax.tree.leaves(state.params)]
    step = jax.jit(functools.partial(sft_step, ctx=ctx))
    rng = np.random.default_rng(6)
    for i in range(3):
        state, _ = step(state, packed_batch(rng, 8, 32, 512), jax.random.key(i))
    for a, b in zip(before, jax.tree.leaves(state.router_bias)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(params_before, jax.tree.leaves(state.params)))
    # the biases are not among the differentiated parameters, nor in the optimizer state
    paths = {p[-1] for p, _ in nnx.to_flat_state(state.params)}
    assert "router_bias" not in paths and "router" in paths
    opt_leaves = jax.tree.leaves(state.opt_state)
    assert sum(x.size for x in opt_leaves) < 3 * sum(x.size for x in jax.tree.leaves(state.params)) + 10


def test_schedule_and_weight_decay_mask():
    cfg = cfg_of("optimizer.lr=1.0", "optimizer.warmup_steps=10", "optimizer.final_lr_ratio=0.1", "train.steps=110")
    sched = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    assert float(sched(0)) == 0.0 and abs(float(sched(5)) - 0.5) < 1e-6 and abs(float(sched(10)) - 1.0) < 1e-6
    mid = 10 + 50  # half way through the cosine: lr * (final + (1 - final) * 0.5)
    assert abs(float(sched(mid)) - (0.1 + 0.9 * 0.5)) < 1e-5 and abs(float(sched(110)) - 0.1) < 1e-6
    ctx = make_context(cfg)
    state = init_train_state(ctx, jax.random.key(0))
    mask = {"/".join(map(str, p)): bool(v.get_value()) for p, v in nnx.to_flat_state(decay_mask(state.params, cfg.optimizer))}
    assert mask["embed"] is False and mask["final_norm/scale"] is False and mask["moe_blocks/mlp/w_gate"] is True
    on = load_config(CONFIGS / "models" / "tiny_qwen2.yaml", ["optimizer.decay_norms=true", "optimizer.decay_biases=true",
                                                             "optimizer.decay_embeddings=true"])
    ctx2 = make_context(on)
    st2 = init_train_state(ctx2, jax.random.key(0))
    assert all(bool(v.get_value()) for _, v in nnx.to_flat_state(decay_mask(st2.params, on.optimizer)))
