"""Logit distillation: the divergences against numpy references from their definitions, and the
update function on a tiny MoE teacher and a tiny dense student with a padded vocabulary."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import CONFIGS
from r1jax.config import load_config
from r1jax.models.transformer import Transformer
from r1jax.train.distill import distill_loss, distill_step, teacher_topk
from r1jax.train.losses import per_token_cross_entropy
from r1jax.train.update import update_router_bias
from r1jax.train.state import init_train_state, make_context, split_model

FLOOR = np.log(np.finfo(np.float32).tiny)  # reverse KL's floor on teacher log-probs (documented)
KINDS = ("forward_kl", "reverse_kl", "jsd")


# --------------------------------------------------------------------------------------------------
# numpy references, float64, from the definitions
# --------------------------------------------------------------------------------------------------


def np_softmax(x):
    with np.errstate(invalid="ignore"):  # an all -inf row (masked out) gives NaN, excluded by the mask
        e = np.exp(x - np.max(x, axis=-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)


def np_divergence(p, q, kind, beta):
    """sum_v over the last axis; p may hold exact zeros, q > 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "forward_kl":
            return np.where(p > 0, p * np.log(p / q), 0.0).sum(-1)
        if kind == "reverse_kl":
            return (q * (np.log(q) - np.maximum(np.log(p), FLOOR))).sum(-1)
        m = beta * p + (1 - beta) * q
        return beta * np.where(p > 0, p * np.log(p / m), 0.0).sum(-1) + (1 - beta) * (q * np.log(q / m)).sum(-1)


def np_loss(s, teacher, mask, kind, beta, tau, scale, vocab):
    """Token mean over mask; teacher = full logits (softened by tau, first `vocab` columns) or
    (topk_logprobs, ids) (renormalised over K; student gathered on ids, softened, renormalised)."""
    if isinstance(teacher, tuple):
        lp, ids = teacher
        p = np_softmax(lp)
        q = np_softmax(np.take_along_axis(s, ids, -1) / tau)
    else:
        p = np_softmax(teacher[..., :vocab] / tau)
        q = np_softmax(s[..., :vocab] / tau)
    d = np_divergence(p, q, kind, beta)
    total = np.where(mask, d, 0.0).sum() * (tau ** 2 if scale else 1.0)
    return total / max(mask.sum(), 1)


def numeric_grad(f, x, eps=1e-5):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        hi, lo = x.copy(), x.copy()
        hi[i] += eps
        lo[i] -= eps
        g[i] = (f(hi) - f(lo)) / (2 * eps)
    return g


def random_case(seed, b=2, s=5, vs=11, vt=9, vocab=8, k=4):
    """Student logits [b, s, vs], teacher logits [b, s, vt] with exact zeros (-inf logits; column 1
    kept finite), a top-k teacher with -inf entries, a mask with gaps, and one masked-out position
    whose teacher row is entirely -inf (must not poison the loss or the gradient)."""
    rng = np.random.default_rng(seed)
    student = rng.normal(0, 2, (b, s, vs))
    teacher = rng.normal(0, 3, (b, s, vt))
    teacher[rng.random((b, s, vt)) < 0.3] = -np.inf
    teacher[..., 1] = rng.normal(0, 3, (b, s))
    mask = rng.random((b, s)) < 0.7
    mask[0, 0], mask[1, -1] = True, False
    teacher[1, -1] = -np.inf
    ids = np.argsort(rng.random((b, s, vocab)), -1)[..., :k].astype(np.int32)
    topk_lp = rng.normal(-2, 1, (b, s, k))
    topk_lp[..., 2:][rng.random((b, s, k - 2)) < 0.4] = -np.inf
    topk_lp[1, -1] = -np.inf
    return student, teacher, (topk_lp, ids), mask


# --------------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["full", "topk"])
@pytest.mark.parametrize("tau,scale,beta", [(1.0, False, 0.5), (2.0, True, 0.2), (0.7, False, 0.9)])
def test_loss_and_gradient_equal_numpy_reference(kind, form, tau, scale, beta):
    student, teacher_logits, topk, mask = random_case(zlib.crc32(f"{kind} {form} {tau}".encode()))
    teacher = teacher_logits if form == "full" else topk
    ref_fn = lambda s: np_loss(s, teacher, mask, kind, beta, tau, scale, 8)  # noqa: E731
    jx_teacher = jnp.asarray(teacher, jnp.float32) if form == "full" else tuple(jnp.asarray(t) for t in teacher)
    fn = lambda s: distill_loss(s, jx_teacher, jnp.asarray(mask), kind=kind, beta=beta, tau=tau,  # noqa: E731
                                tau_sq_scale=scale, vocab=8)
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(student, jnp.float32))
    np.testing.assert_allclose(float(loss), ref_fn(student), rtol=2e-5, atol=1e-6)
    assert float(metrics["tokens"]) == mask.sum()
    ref_grad = numeric_grad(ref_fn, student)
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-3, atol=2e-6)
    # gradient only where it should be: trained positions, the first `vocab` columns (full) or the top-k ids
    assert np.all(np.asarray(grad)[~mask] == 0)
    off = np.ones(student.shape, bool)
    if form == "full":
        off[..., :8] = False
    else:
        np.put_along_axis(off, topk[1], False, -1)
    assert np.all(np.asarray(grad)[off] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_divergence_and_gradient_when_student_equals_teacher(kind):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(0, 3, (2, 6, 16)), jnp.float32)
    mask = jnp.ones((2, 6), bool)
    for teacher in (logits, teacher_topk(logits, 5, 1.5)):
        fn = lambda s: distill_loss(s, teacher, mask, kind=kind, beta=0.3, tau=1.5)[0]  # noqa: E731,B023
        loss, grad = jax.value_and_grad(fn)(logits)
        assert abs(float(loss)) < 1e-6
        np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-7)
    # and strictly positive when they differ
    other = logits + jnp.asarray(rng.normal(0, 1, logits.shape), jnp.float32)
    assert float(distill_loss(other, logits, mask, kind=kind)[0]) > 1e-3


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_bounded_by_binary_entropy(beta):
    """JSD(beta) <= h(beta) (log 2 at beta = 1/2), with equality for disjoint supports."""
    h = -beta * np.log(beta) - (1 - beta) * np.log(1 - beta)
    rng = np.random.default_rng(2)
    mask = jnp.ones((3, 4), bool)
    s = jnp.asarray(rng.normal(0, 5, (3, 4, 10)), jnp.float32)
    t = jnp.asarray(rng.normal(0, 5, (3, 4, 10)), jnp.float32)
    assert 0 < float(distill_loss(s, t, mask, kind="jsd", beta=beta)[0]) < h
    disjoint_t = jnp.where(jnp.arange(10) < 5, t, -jnp.inf)  # teacher on the first half only
    disjoint_s = jnp.where(jnp.arange(10) < 5, -1e4, s)  # student's mass on the second half
    np.testing.assert_allclose(float(distill_loss(disjoint_s, disjoint_t, mask, kind="jsd", beta=beta)[0]), h,
                               rtol=1e-5)


def test_jsd_beta_convention_teacher_is_p():
    """GKD: JSD(beta) / beta -> KL(teacher || student) as beta -> 0, and
    JSD(beta) / (1 - beta) -> KL(student || teacher) as beta -> 1."""
    rng = np.random.default_rng(3)
    s, t = (rng.normal(0, 1, (2, 3, 7)) for _ in range(2))
    mask = np.ones((2, 3), bool)
    fkl = np_loss(s, t, mask, "forward_kl", 0, 1.0, False, 7)
    rkl = np_loss(s, t, mask, "reverse_kl", 0, 1.0, False, 7)
    assert abs(fkl - rkl) > 0.05 * fkl  # the two directions are told apart
    jsd = lambda beta: float(distill_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),  # noqa: E731
                                          jnp.asarray(mask), kind="jsd", beta=beta)[0])
    np.testing.assert_allclose(jsd(1e-3) / 1e-3, fkl, rtol=1e-2)
    np.testing.assert_allclose(jsd(1 - 1e-3) / 1e-3, rkl, rtol=1e-2)


def test_teacher_topk_equals_numpy_and_ignores_padded_columns():
    rng = np.random.default_rng(4)
    t = rng.normal(0, 2, (2, 5, 12))
    t[..., 10:] = 50.0  # padded model rows beyond vocab=10: must never be picked
    values, ids = teacher_topk(jnp.asarray(t, jnp.float32), 3, 1.7, vocab=10)
    logp = np.log(np_softmax(t[..., :10] / 1.7))
    ref_ids = np.argsort(-logp, -1)[..., :3]
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_allclose(np.asarray(values), np.take_along_axis(logp, ref_ids, -1), rtol=1e-5, atol=1e-6)


def test_argument_errors():
    s, t, m = jnp.zeros((1, 2, 8)), jnp.zeros((1, 2, 6)), jnp.ones((1, 2), bool)
    with pytest.raises(ValueError, match="vocab"):
        distill_loss(s, t, m)  # widths differ and no vocab given
    with pytest.raises(ValueError, match="exceeds"):
        distill_loss(s, t, m, vocab=7)
    with pytest.raises(ValueError, match="beta"):
        distill_loss(s, t, m, kind="jsd", beta=1.0, vocab=6)
    with pytest.raises(ValueError, match="unknown"):
        distill_loss(s, t, m, kind="tvd", vocab=6)


# --------------------------------------------------------------------------------------------------
# the update function: tiny MoE teacher (deepseek_v3), tiny dense student (qwen2, padded vocab)
# --------------------------------------------------------------------------------------------------

VOCAB = 512  # the shared tokenizer; the student's model vocab is padded to 640


COMMON = ["train.batch_size=4", "train.seq_len=16", "optimizer.lr=1e-2", "optimizer.warmup_steps=0",
          "optimizer.schedule=constant", "train.steps=100"]


def packed_batch(seed):
    """4 rows of two documents then padding; trained targets from position 3 on within a document."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (4, 16)).astype(np.int32)
    seg = np.ones((4, 16), np.int32)
    seg[:, 9:] = 2
    seg[:, 14:] = 0  # two documents then padding
    pos = np.where(seg == 2, np.arange(16) - 9, np.arange(16)) * (seg != 0)
    targets = np.concatenate([tokens[:, 1:], np.zeros((4, 1), np.int32)], 1)
    loss_mask = (seg != 0) & (np.roll(seg, -1, 1) == seg) & (np.arange(16) >= 3)
    return {"tokens": tokens, "targets": targets * loss_mask, "loss_mask": loss_mask, "segment_ids": seg,
            "positions": pos.astype(np.int32)}


def models(teacher, student, *student_overrides):
    """(student ctx, teacher graphdef, params, router bias); the teacher's init is scaled up so that its
    next-token distributions are far from uniform."""
    t_cfg = load_config(CONFIGS / "models" / f"{teacher}.yaml", [*COMMON, "model.n_layers=2", "model.init_std=0.3"])
    s_cfg = load_config(CONFIGS / "models" / f"{student}.yaml", [*COMMON, *student_overrides])
    t_graphdef, t_params, t_bias = split_model(Transformer(t_cfg.model, nnx.Rngs(1)))
    return make_context(s_cfg), t_graphdef, t_params, t_bias


@functools.cache
def setup():
    """MoE DeepSeek-V3 teacher (vocab 512), dense Qwen2 student whose model vocab is padded to 640."""
    return *models("tiny_v3", "tiny_qwen2", "model.vocab_size=640"), packed_batch(5)


def step_fn(ctx, t_graphdef, **kw):
    return functools.partial(distill_step, ctx=ctx, teacher_graphdef=t_graphdef, vocab=VOCAB, **kw)


def test_distill_step_trains_student_and_leaves_teacher():
    ctx, t_graphdef, t_params, t_bias, batch = setup()
    teacher_before = [np.array(x) for x in jax.tree.leaves((t_params, t_bias))]
    state = init_train_state(ctx, jax.random.key(0))
    student_before = [np.array(x) for x in jax.tree.leaves(state.params)]
    embed_before = np.array(state.params["embed"][...])

    # the first step's metrics equal the loss computed here from the two models' forwards
    t_logits, _ = nnx.merge(t_graphdef, t_params, t_bias)(batch["tokens"], batch["positions"], batch["segment_ids"])
    s_logits, _ = nnx.merge(ctx.graphdef, state.params, state.router_bias)(batch["tokens"], batch["positions"],
                                                                           batch["segment_ids"])
    assert t_logits.shape[-1] == VOCAB and s_logits.shape[-1] == 640
    want, _ = distill_loss(s_logits, t_logits, batch["loss_mask"], kind="forward_kl", tau=2.0, tau_sq_scale=True,
                           vocab=VOCAB)
    ce = per_token_cross_entropy(s_logits[..., :VOCAB], batch["targets"])
    want_ce = np.sum(np.asarray(ce) * batch["loss_mask"]) / batch["loss_mask"].sum()

    step = jax.jit(step_fn(ctx, t_graphdef, kind="forward_kl", tau=2.0, tau_sq_scale=True, ce_weight=0.1),
                   donate_argnums=0)
    losses = []
    for i in range(8):
        state, m = step(state, t_params, t_bias, batch, jax.random.key(i))
        if i == 0:
            np.testing.assert_allclose(float(m["loss"]), float(want), rtol=1e-5)
            np.testing.assert_allclose(float(m["ce"]), want_ce, rtol=1e-5)
            np.testing.assert_allclose(float(m["objective"]), float(want) + 0.1 * want_ce, rtol=1e-5)
        losses.append(float(m["loss"]))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(teacher_before, jax.tree.leaves((t_params, t_bias))))
    assert all(not np.array_equal(a, np.asarray(b)) for a, b in zip(student_before, jax.tree.leaves(state.params)))
    embed = np.asarray(state.params["embed"][...])  # tied: the head's padded rows get no gradient, no decay
    np.testing.assert_array_equal(embed[VOCAB:], embed_before[VOCAB:])
    assert not np.array_equal(embed[:VOCAB], embed_before[:VOCAB])


def test_teacher_gets_exactly_zero_gradient():
    ctx, t_graphdef, t_params, t_bias, batch = setup()
    state = init_train_state(ctx, jax.random.key(0))
    step = step_fn(ctx, t_graphdef, kind="jsd", beta=0.3, top_k=8, ce_weight=0.1)

    def step_loss(tp):
        _, m = step(state, tp, t_bias, batch, jax.random.key(0))
        return m["loss"] + m["objective"]

    grads = jax.jit(jax.grad(step_loss))(t_params)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))

    # control: the same loss outside the step does depend on the teacher's parameters
    s_logits, _ = nnx.merge(ctx.graphdef, state.params, state.router_bias)(batch["tokens"], batch["positions"],
                                                                           batch["segment_ids"])

    def outside(tp):
        t_logits, _ = nnx.merge(t_graphdef, tp, t_bias)(batch["tokens"], batch["positions"], batch["segment_ids"])
        return distill_loss(s_logits, teacher_topk(t_logits, 8, 1.0), batch["loss_mask"], kind="jsd", beta=0.3,
                            vocab=VOCAB)[0]

    outside_grads = jax.jit(jax.grad(outside))(t_params)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(outside_grads)) > 0


def test_moe_student_router_bias_and_microbatches():
    """A MoE student (grad_accum=2, top-k teacher, reverse KL): the loss is the whole batch's token
    mean, and the router biases move by the aux-loss-free rule on the whole batch's expert loads."""
    ctx, t_graphdef, t_params, t_bias = models("tiny_llama3", "tiny_v3", "model.n_layers=2", "train.grad_accum=2",
                                               "train.bias_update_speed=0.01")
    batch = packed_batch(6)
    state = init_train_state(ctx, jax.random.key(0))
    assert jax.tree.leaves(state.router_bias)
    t_logits, _ = nnx.merge(t_graphdef, t_params, t_bias)(batch["tokens"], batch["positions"], batch["segment_ids"])
    s_logits, aux = nnx.merge(ctx.graphdef, state.params, state.router_bias)(batch["tokens"], batch["positions"],
                                                                             batch["segment_ids"])
    want, _ = distill_loss(s_logits, teacher_topk(t_logits, 16, 1.0, VOCAB), batch["loss_mask"], kind="reverse_kl")
    want_bias = update_router_bias(state.router_bias, {"moe": aux["moe_load"]}, 0.01)
    bias_before = [np.array(x) for x in jax.tree.leaves(state.router_bias)]

    step = jax.jit(step_fn(ctx, t_graphdef, kind="reverse_kl", top_k=16))
    new, m = step(state, t_params, t_bias, batch, jax.random.key(0))
    np.testing.assert_allclose(float(m["loss"]), float(want), rtol=1e-5)
    assert np.isfinite(float(m["balance_loss"])) and float(m["tokens"]) == batch["loss_mask"].sum()
    got = [np.asarray(x) for x in jax.tree.leaves(new.router_bias)]
    for g, w, b in zip(got, jax.tree.leaves(want_bias), bias_before):
        np.testing.assert_allclose(g, np.asarray(w), atol=1e-7)
    assert any(not np.array_equal(g, b) for g, b in zip(got, bias_before))
