"""Chunked output head (train/losses.py `head_chunks`): the SFT (+ MTP), GRPO and distillation losses
computed chunk by chunk from hidden states equal the same losses re-derived here from the full
logits with jax.nn.log_softmax (values and parameter gradients, float32), with a chunk smaller than
the sequence that does not divide it; GRPO's log-prob pass microbatched and on rollouts packed by
length equals the plain pass; and XLA's memory_analysis shows no [B, S, vocab] buffer in sft_step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import CONFIGS
from r1jax.config import load_config
from r1jax.models.transformer import init_model
from r1jax.train.distill import chunked_distill_terms
from r1jax.train.grpo import pack_plan, packed_rows, rollout_batch, token_logprobs, unpack_rows
from r1jax.train.losses import (chunked_cross_entropy, chunked_mtp_cross_entropy, chunked_sampled_logprobs,
                                mtp_targets, policy_objective)
from r1jax.train.sft import sft_step
from r1jax.train.state import abstract_train_state, make_context, split_model

S, CHUNK = 13, 5  # 3 chunks, the last one partial


def model_of(name, *overrides, seed=0):
    cfg = load_config(CONFIGS / "models" / f"{name}.yaml", ["model.n_layers=1", *overrides])
    graphdef, state = init_model(cfg.model, jax.random.key(seed))  # jitted init: eager takes seconds
    graphdef, params, bias = split_model(nnx.merge(graphdef, state))
    return cfg, graphdef, params, bias


def rows(seed, b=2, vocab=512):
    """Two packed documents per row, then padding; random trained targets."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (b, S)).astype(np.int32)
    seg = np.ones((b, S), np.int32)
    seg[:, 7:] = 2
    seg[:, 11:] = 0
    pos = np.where(seg == 2, np.arange(S) - 7, np.arange(S)) * (seg != 0)
    same = (seg != 0) & (np.roll(seg, -1, 1) == seg)
    same[:, -1] = False
    mask = (same & (rng.random((b, S)) < 0.8)).astype(np.float32)
    targets = np.where(same, np.roll(tokens, -1, 1), 0).astype(np.int32)
    return {"tokens": tokens, "targets": targets, "loss_mask": mask, "segment_ids": seg,
            "positions": pos.astype(np.int32)}


def picked(logits, targets):
    """log softmax(logits)[target], from the full logits."""
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


def values_and_grads(chunked, full, params, has_aux=False):
    """value_and_grad of both functions at params, compiled as one program (one compile per test)."""
    vg = functools.partial(jax.value_and_grad, has_aux=has_aux)
    return jax.jit(lambda p: (vg(chunked)(p), vg(full)(p)))(params)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
    assert max(float(jnp.max(jnp.abs(y))) for y in lb) > 1e-3  # the gradients are not all zero


def test_sft_cross_entropy_and_mtp_chunked_equal_full_logits():
    cfg, graphdef, params, bias = model_of("tiny_v3", "model.n_routed_experts=0")  # MLA, MTP depth 1
    batch = rows(0)
    t, m = mtp_targets(jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_mask"]),
                       jnp.asarray(batch["segment_ids"]), cfg.model.mtp_depth)
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"]

    def chunked(p):
        model = nnx.merge(graphdef, p, bias)
        h, aux = model(*args, with_mtp=True, logits=False)
        assert h.shape == (2, S, cfg.model.d_model) and "mtp_logits" not in aux
        ce, n = chunked_cross_entropy(h, model.head, batch["targets"], mask, CHUNK)
        mtp = chunked_mtp_cross_entropy(aux["mtp_hidden"], model.head, t, m, CHUNK)  # [D]
        return ce / n + 0.3 * jnp.sum(mtp), (ce, mtp)

    def full(p):
        logits, aux = nnx.merge(graphdef, p, bias)(*args, with_mtp=True)  # [B, S, V], [D, B, S, V]
        ce = -jnp.sum(picked(logits, batch["targets"]) * mask)
        mtp = -jnp.sum(picked(aux["mtp_logits"], t) * m, axis=(1, 2))
        return ce / mask.sum() + 0.3 * jnp.sum(mtp), (ce, mtp)

    ((v1, parts1), g1), ((v2, parts2), g2) = values_and_grads(chunked, full, params, has_aux=True)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
    assert_trees_close(parts1, parts2, rtol=1e-6)
    assert float(parts2[1][0]) > 1.0  # the MTP depth counts real tokens
    assert_trees_close(g1, g2)


def test_grpo_objective_and_logprob_pass_chunked_equal_full_logits():
    cfg, graphdef, params, bias = model_of("tiny_qwen2", f"model.logits_chunk={CHUNK}")
    rng = np.random.default_rng(1)
    b = 4
    tokens = rng.integers(1, 512, (b, S)).astype(np.int32)
    batch = {k: np.asarray(v) for k, v in rollout_batch(jnp.asarray(tokens), jnp.asarray([2, 3, 4, 2]),
                                                         jnp.asarray([13, 9, 11, 6])).items()}
    old = (np.log(1 / 512) + rng.normal(0, 0.3, (b, S))).astype(np.float32)  # ratios straddle the clip
    ref = (old + rng.normal(0, 0.3, (b, S))).astype(np.float32)
    adv = rng.normal(0, 1, b).astype(np.float32)
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    kw = dict(clip_low=0.2, clip_high=0.28, ref_logp=ref, beta=0.04, aggregation="token-mean")

    def objective(logp, entropy):
        loss, stats = policy_objective(logp, old, adv, batch["response_mask"], **kw)
        return loss, dict(stats, entropy=jnp.sum(entropy * batch["response_mask"]), logp=logp)

    def chunked(p):
        model = nnx.merge(graphdef, p, bias)
        h, _ = model(*args, logits=False)
        return objective(*chunked_sampled_logprobs(h, model.head, batch["targets"], CHUNK))

    def full(p):
        logits, _ = nnx.merge(graphdef, p, bias)(*args)
        lsm = jax.nn.log_softmax(logits, axis=-1)
        entropy = -jnp.sum(jnp.exp(lsm) * lsm, axis=-1)
        return objective(picked(logits, batch["targets"]), jax.lax.stop_gradient(entropy))

    ((v1, s1), g1), ((v2, s2), g2) = values_and_grads(chunked, full, params, has_aux=True)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
    assert abs(float(v2)) > 1e-3 and 0 < float(s2["clip_fraction"]) < 1 and float(s2["kl"]) > 0
    assert_trees_close(s1, s2, rtol=1e-6)
    assert_trees_close(g1, g2)

    # the pi_old / pi_ref pass: 2 microbatches (interleaved rows) of chunked log-probs, in row order
    ctx = make_context(cfg)
    logp = jax.jit(functools.partial(token_logprobs, ctx=ctx, micro=2))(params, bias, batch)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(s2["logp"]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="3 log-prob microbatches do not divide 4 rows"):
        token_logprobs(params, bias, batch, ctx=ctx, micro=3)


def divergence(lp, lq, kind):
    """Forward KL sum p (log p - log q) or reverse KL sum q (log q - log p), from log-probs."""
    if kind == "forward_kl":
        return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
    return jnp.sum(jnp.exp(lq) * (lq - lp), axis=-1)


def test_distillation_chunked_equals_full_logits():
    """A Llama teacher (vocab 512) and a Qwen2 student whose model vocab is padded to 640: the
    first 512 columns are compared. Full teacher: forward KL at tau 2; top-6 teacher: reverse KL at
    tau 1.5, the teacher's top-k renormalised and the student's log-probs gathered on those ids
    renormalised (`distill` module docstring)."""
    vocab = 512
    settings = [(0, "forward_kl", 2.0), (6, "reverse_kl", 1.5)]
    _, t_graphdef, t_params, t_bias = model_of("tiny_llama3", "model.init_std=0.3", seed=1)
    _, s_graphdef, s_params, s_bias = model_of("tiny_qwen2", "model.vocab_size=640")
    batch = rows(2)
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"]
    teacher = nnx.merge(t_graphdef, t_params, t_bias)

    def chunked(p, top_k, kind, tau):
        student = nnx.merge(s_graphdef, p, s_bias)
        h, _ = student(*args, logits=False)
        t_h, _ = teacher(*args, logits=False)
        div, ce = chunked_distill_terms(h, student.head, t_h, teacher.head, batch["targets"], mask, CHUNK,
                                        kind=kind, tau=tau, vocab=vocab, top_k=top_k)
        return jnp.sum(jnp.where(mask > 0, div, 0.0)) + 0.1 * jnp.sum(ce * mask)

    def full(p, top_k, kind, tau):
        s_logits, _ = nnx.merge(s_graphdef, p, s_bias)(*args)  # [B, S, 640]
        t_logits, _ = teacher(*args)  # [B, S, 512]
        lp = jax.nn.log_softmax(t_logits[..., :vocab] / tau, axis=-1)
        lq = jax.nn.log_softmax(s_logits[..., :vocab] / tau, axis=-1)
        if top_k:
            values, ids = jax.lax.top_k(lp, top_k)
            lp = jax.nn.log_softmax(values, axis=-1)
            lq = jax.nn.log_softmax(jnp.take_along_axis(s_logits, ids, axis=-1) / tau, axis=-1)
        ce = -picked(s_logits[..., :vocab], batch["targets"])
        return jnp.sum(divergence(lp, lq, kind) * mask) + 0.1 * jnp.sum(ce * mask)

    def all_settings(fn):
        return lambda p: [jax.value_and_grad(fn)(p, *setting) for setting in settings]

    got, want = jax.jit(lambda p: (all_settings(chunked)(p), all_settings(full)(p)))(s_params)
    for (v1, g1), (v2, g2) in zip(got, want):
        np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
        assert float(v2) > 1e-2
        assert_trees_close(g1, g2)
        embed = np.asarray(g1["embed"][...])
        assert np.all(embed[vocab:] == 0)  # the student's padded vocab rows get no gradient


def test_pack_plan_places_every_rollout_token_once():
    lengths = np.array([9, 3, 12, 4, 5, 2, 7, 6])
    width = 13
    plan = pack_plan(lengths, width, multiple=2)
    assert plan["src"].shape == (4, width)  # 48 tokens: first-fit in 4 rows (2 * 2^1), 8 unpacked
    src = plan["src"]
    want = np.sort(np.concatenate([i * width + np.arange(n) for i, n in enumerate(lengths)]))
    np.testing.assert_array_equal(np.sort(src[src >= 0]), want)
    np.testing.assert_array_equal(plan["positions"][src >= 0], src[src >= 0] % width)
    assert np.all(plan["segment_ids"][src < 0] == 0) and np.all(plan["segment_ids"][src >= 0] > 0)
    for i, n in enumerate(lengths):
        slots = plan["unpack"][i, :n]
        assert np.all(plan["unpack"][i, n:] == -1)
        np.testing.assert_array_equal(src.reshape(-1)[slots], i * width + np.arange(n))
        assert len(set(plan["segment_ids"].reshape(-1)[slots])) == 1  # one segment: one rollout
    assert pack_plan(np.full(8, 12), width, multiple=2) is None  # one per row: nothing to save


def test_packed_logprob_pass_equals_the_rollout_rows_pass():
    """pi_old on rollouts packed several to a row (restarted positions, segment ids) mapped back to
    the rollout rows equals the plain per-rollout pass, at every real token."""
    cfg, graphdef, params, bias = model_of("tiny_qwen2", f"model.logits_chunk={CHUNK}")
    rng = np.random.default_rng(3)
    n = 8
    tlens = np.array([13, 3, 6, 7, 4, 5, 6, 2])  # a full row, and rollouts shorter than a chunk
    plens = np.minimum(rng.integers(2, 5, n), tlens - 1)
    tokens = np.where(np.arange(S)[None] < tlens[:, None], rng.integers(1, 512, (n, S)), 0).astype(np.int32)
    batch = rollout_batch(jnp.asarray(tokens), jnp.asarray(plens), jnp.asarray(tlens))
    plan = pack_plan(tlens, S, multiple=2)
    assert len(plan["src"]) == 4  # 46 tokens in 4 rows of 13: 13 | 7 6 | 6 5 2 | 4 3
    ctx = make_context(cfg)

    @jax.jit
    def packed(p, b, plan):
        return unpack_rows(token_logprobs(p, bias, packed_rows(b, plan), ctx=ctx, micro=2), plan)

    got = np.asarray(packed(params, batch, plan))
    logits, _ = nnx.merge(graphdef, params, bias)(batch["tokens"], batch["positions"], batch["segment_ids"])
    want = np.asarray(picked(logits, batch["targets"]))
    real = np.arange(S)[None] < tlens[:, None]
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert np.all(got[~real] == 0)


def _sft_temp_bytes(chunk: int, b: int, s: int, vocab: int) -> int:
    cfg = load_config(CONFIGS / "models" / "tiny_qwen2.yaml",
                      [f"model.vocab_size={vocab}", f"model.logits_chunk={chunk}", "model.n_layers=1"])
    ctx = make_context(cfg)
    state = abstract_train_state(ctx)
    batch = {k: jax.ShapeDtypeStruct((b, s), jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    step = jax.jit(functools.partial(sft_step, ctx=ctx))
    compiled = step.lower(state, batch, jax.ShapeDtypeStruct((), jax.random.key(0).dtype)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_sft_step_holds_no_batch_by_sequence_by_vocab_buffer():
    b, s, vocab = 16, 128, 16384  # short rows: the attention scores stay small beside the logits
    logits_bytes = b * s * vocab * 4  # one [B, S, V] float32 array: 128 MiB (the params: 4 MiB)
    full = _sft_temp_bytes(0, b, s, vocab)
    chunked = _sft_temp_bytes(8, b, s, vocab)  # [B, 8, V] float32: 8 MiB
    print(f"sft_step temp bytes: one chunk {full / 2**20:.1f} MiB, chunks of 8 {chunked / 2**20:.1f} MiB, "
          f"[B, S, V] float32 {logits_bytes / 2**20:.0f} MiB")
    assert full > logits_bytes, (full, logits_bytes)
    assert chunked < logits_bytes / 2, (chunked, logits_bytes)
