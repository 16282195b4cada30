"""GRPO math against a straightforward re-derivation written here from the papers' formulas:
DeepSeekMath eqs. 3-4 (clipped surrogate, k3 KL), DAPO (clip-higher, token-mean, overlong),
Dr. GRPO (no std, sum-norm), GSPO (sequence ratio); losses and their gradients, with padding."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.train.grpo import rollout_batch
from r1jax.train.losses import aggregate_norm, group_advantages, overlong_penalty, policy_objective


def reference_loss(logp, old, ref, adv, mask, *, lo, hi, beta, kl, agg, seq_ratio, max_len):
    """Loop over sequences and tokens; jnp scalars so jax.grad can differentiate it."""
    per_seq, lengths = [], []
    for i in range(logp.shape[0]):
        tokens = [t for t in range(logp.shape[1]) if mask[i, t]]
        if not tokens:
            continue
        if seq_ratio:  # GSPO: s_i = (prod_t pi/pi_old)^(1/|o_i|)
            s = jnp.exp(sum(logp[i, t] - old[i, t] for t in tokens) / len(tokens))
        terms = []
        for t in tokens:
            r = s if seq_ratio else jnp.exp(logp[i, t] - old[i, t])
            surrogate = jnp.minimum(r * adv[i], jnp.clip(r, 1 - lo, 1 + hi) * adv[i])
            if kl == "k3":  # DeepSeekMath eq. 4: pi_ref/pi - log(pi_ref/pi) - 1
                q = jnp.exp(ref[i, t] - logp[i, t])
                d = q - jnp.log(q) - 1
            elif kl == "k2":
                d = 0.5 * (logp[i, t] - ref[i, t]) ** 2
            else:
                d = logp[i, t] - ref[i, t]
            terms.append(-(surrogate - beta * d))
        per_seq.append(terms)
        lengths.append(len(tokens))
    if agg == "seq-mean-token-mean":
        return sum(sum(ts) / len(ts) for ts in per_seq) / len(per_seq)
    if agg == "token-mean":
        return sum(sum(ts) for ts in per_seq) / sum(lengths)
    return sum(sum(ts) / max_len for ts in per_seq) / len(per_seq)


def inputs(seed):
    rng = np.random.default_rng(seed)
    b, t = 5, 7
    logp = -rng.uniform(0.05, 3.0, (b, t)).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (b, t))).astype(np.float32)  # ratios well inside and outside the clip
    ref = (logp + rng.normal(0, 0.5, (b, t))).astype(np.float32)
    adv = rng.normal(0, 1, b).astype(np.float32)
    lens = np.array([7, 3, 0, 5, 1])  # padding, and a sequence with no response tokens
    mask = (np.arange(t)[None] < lens[:, None]).astype(np.float32)
    return logp, old, ref, adv, mask


CASES = list(itertools.product(["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"], ["k1", "k2", "k3"],
                               [(0.2, 0.2), (0.2, 0.28)], [False, True]))


@pytest.mark.parametrize("agg,kl,clip,seq_ratio", CASES)
def test_loss_and_gradient_match_the_formulas(agg, kl, clip, seq_ratio):
    logp, old, ref, adv, mask = inputs(CASES.index((agg, kl, clip, seq_ratio)))
    kw = dict(lo=clip[0], hi=clip[1], beta=0.04, kl=kl, agg=agg, seq_ratio=seq_ratio, max_len=7)

    def ours(lp):
        return policy_objective(lp, old, adv, mask, clip_low=clip[0], clip_high=clip[1],
                                ratio_level="sequence" if seq_ratio else "token", ref_logp=ref, beta=0.04, kl=kl,
                                aggregation=agg, max_len=7)[0]

    def theirs(lp):
        return reference_loss(lp, old, ref, adv, mask, **kw)

    lp = jnp.asarray(logp)
    np.testing.assert_allclose(float(ours(lp)), float(theirs(lp)), rtol=1e-5, atol=1e-6)
    g1, g2 = jax.grad(ours)(lp), jax.grad(theirs)(lp)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(g1)[mask == 0] == 0)  # padding gets no gradient


def test_without_beta_no_kl_and_clip_fraction():
    logp, old, ref, adv, mask = inputs(7)
    loss, stats = policy_objective(jnp.asarray(logp), old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert "kl" not in stats
    ratio = np.exp(logp - old)
    a = adv[:, None]
    clipped = np.clip(ratio, 0.8, 1.2) * a < ratio * a
    np.testing.assert_allclose(float(stats["clip_fraction"]), (clipped * mask).sum() / mask.sum(), rtol=1e-6)


def test_group_advantages():
    r = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.25, 1.0], np.float32)
    g = 4
    groups = r.reshape(-1, g)
    want = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(group_advantages(jnp.asarray(r), g)), want.reshape(-1), rtol=1e-5)
    want = groups - groups.mean(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(group_advantages(jnp.asarray(r), g, std_normalize=False)), want.reshape(-1),
                               rtol=1e-6)
    loo = np.array([[x - (row.sum() - x) / (g - 1) for x in row] for row in groups])
    np.testing.assert_allclose(np.asarray(group_advantages(jnp.asarray(r), g, std_normalize=False, leave_one_out=True)),
                               loo.reshape(-1), rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(group_advantages(jnp.asarray(r), g))[4:8] == 0)  # all-equal group: zero advantage


def test_overlong_penalty_dapo_eq_13():
    lengths = np.array([10, 80, 81, 90, 100, 101, 200])
    got = np.asarray(overlong_penalty(jnp.asarray(lengths), max_len=100, cache_len=20))
    want = [0.0 if n <= 80 else ((80 - n) / 20 if n <= 100 else -1.0) for n in lengths]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_rollout_rows_mark_exactly_the_response():
    tokens = jnp.asarray([[5, 6, 7, 8, 9, 0, 0], [1, 2, 3, 4, 5, 6, 7]])
    rows = rollout_batch(tokens, jnp.asarray([2, 3]), jnp.asarray([5, 7]))
    # row 0: prompt 5 6, response 7 8 9 -> targets at positions 1..3 are the response tokens
    np.testing.assert_array_equal(np.asarray(rows["response_mask"][0]), [0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(rows["targets"][0])[:4], [6, 7, 8, 9])
    np.testing.assert_array_equal(np.asarray(rows["response_mask"][1]), [0, 0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(rows["segment_ids"][0]), [1, 1, 1, 1, 1, 0, 0])


def test_group_std_is_the_population_std():
    """DeepSeekMath's std(r) leaves ddof open; r1jax takes the population std (divide by G): for the
    group [1, 0, 0, 0] that is sqrt(3/16), not the sample std 1/2 (ddof 1, TRL's)."""
    r = [1.0, 0.0, 0.0, 0.0]
    mean = sum(r) / 4
    population = (sum((x - mean) ** 2 for x in r) / 4) ** 0.5
    sample = (sum((x - mean) ** 2 for x in r) / 3) ** 0.5
    got = np.asarray(group_advantages(jnp.asarray(r), 4, eps=0.0))
    np.testing.assert_allclose(got, [(x - mean) / population for x in r], rtol=1e-6)
    assert not np.allclose(got, [(x - mean) / sample for x in r], rtol=1e-3)


def test_batch_std_divides_by_each_strata_std_of_the_centred_rewards():
    """std_over="batch": r_i - mean(group), divided by the population std of those centred rewards
    over every row of the same stratum (REINFORCE++-baseline), written out in plain Python."""
    g = 4
    r = [0.1, 0.2, 0.1, 0.2,  3.0, -3.0, 3.0, -3.0,  1.0, 0.0, 0.0, 0.0,  1.0, 1.0, 1.0, 1.0]
    strata = [1] * 8 + [0] * 8  # two reward-model groups, two rule groups
    centred = []
    for k in range(0, len(r), g):
        m = sum(r[k:k + g]) / g
        centred += [x - m for x in r[k:k + g]]
    std = {s: (sum(c * c for c, t in zip(centred, strata) if t == s) / strata.count(s)) ** 0.5 for s in (0, 1)}
    want = [c / std[t] for c, t in zip(centred, strata)]
    got = np.asarray(group_advantages(jnp.asarray(r), g, std_over="batch", strata=np.asarray(strata), eps=0.0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # the group of nearly equal scores keeps small advantages where the per-group std makes them +-1
    assert np.abs(got[:4]).max() < 0.1
    np.testing.assert_allclose(np.abs(np.asarray(group_advantages(jnp.asarray(r), g, eps=0.0))[:4]), 1.0, rtol=1e-5)
    # one stratum: the std over the whole batch
    whole = (sum(c * c for c in centred) / len(centred)) ** 0.5
    np.testing.assert_allclose(np.asarray(group_advantages(jnp.asarray(r), g, std_over="batch", eps=0.0)),
                               [c / whole for c in centred], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_microbatch_losses_with_the_batch_norm_add_up_to_the_batch_loss(agg):
    logp, old, ref, adv, mask = inputs(11)
    kw = dict(clip_low=0.2, clip_high=0.28, ref_logp=ref, beta=0.04, aggregation=agg, max_len=7)
    whole, whole_stats = policy_objective(jnp.asarray(logp), old, adv, mask, **kw)
    norm = aggregate_norm(mask)
    parts = [policy_objective(jnp.asarray(logp[i]), old[i], adv[i], mask[i], **dict(kw, ref_logp=ref[i]), norm=norm)
             for i in (np.array([0, 2, 4]), np.array([1, 3]))]
    np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(whole), rtol=1e-6)
    for key in ("clip_fraction", "kl"):
        np.testing.assert_allclose(sum(float(p[1][key]) for p in parts), float(whole_stats[key]), rtol=1e-6)


def _grpo_batch(rng, b, s, vocab):
    """Rollout rows of varied prompt and response lengths, with pi_old, pi_ref and advantages."""
    tokens = rng.integers(1, vocab, (b, s)).astype(np.int32)
    plens = rng.integers(2, 6, b)
    tlens = np.minimum(plens + rng.integers(1, s - 5, b), s)
    rows = {k: np.asarray(v) for k, v in rollout_batch(jnp.asarray(tokens), jnp.asarray(plens),
                                                        jnp.asarray(tlens)).items()}
    # About a random model's log-probs (log 1/512 = -6.24), so ratios straddle the clip range
    old = np.log(1 / vocab) + rng.normal(0, 0.3, (b, s))
    rows["old_logp"] = old.astype(np.float32)
    rows["ref_logp"] = (old + rng.normal(0, 0.3, (b, s))).astype(np.float32)
    rows["advantages"] = rng.normal(0, 1, b).astype(np.float32)
    return rows


def test_grpo_step_with_grad_accumulation_equals_one_big_batch():
    """grpo_step over 4 microbatches takes the step one pass over the whole minibatch takes (the
    tiny MoE: balance loss and router-bias loads accumulate too). Token-mean aggregation, with a KL
    term; the other aggregations' microbatch sums are checked above without the model."""
    agg = "token-mean"
    from conftest import CONFIGS
    from r1jax.config import load_config
    from r1jax.train.grpo import GRPOLoss, grpo_step
    from r1jax.train.state import init_train_state, make_context

    loss = GRPOLoss(clip_low=0.2, clip_high=0.28, beta=0.04, aggregation=agg, max_len=16)
    batch = _grpo_batch(np.random.default_rng(3), 8, 24, 512)
    out = {}
    for a in (1, 4):
        cfg = load_config(CONFIGS / "models" / "tiny_v3.yaml", ["model.n_layers=2", "optimizer.lr=1e-4",
                                                                "optimizer.warmup_steps=0", f"train.grad_accum={a}"])
        ctx = make_context(cfg, loss=loss)
        state = init_train_state(ctx, jax.random.key(0))
        step = jax.jit(lambda st, b, ctx=ctx: grpo_step(st, b, None, ctx=ctx))
        out[a] = step(state, batch)
    (s1, m1), (s4, m4) = out[1], out[4]
    for key in ("loss", "policy_loss", "kl", "clip_fraction", "entropy", "balance_loss"):
        np.testing.assert_allclose(float(m4[key]), float(m1[key]), atol=1e-6, rtol=0, err_msg=key)
    assert abs(float(m1["loss"])) > 1e-3 and float(m1["grad_norm"]) > 0 and 0 < float(m1["clip_fraction"]) < 1
    assert float(m1["kl"]) > 0
    for x, y in zip(jax.tree.leaves((s1.params, s1.router_bias)), jax.tree.leaves((s4.params, s4.router_bias))):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# Sampler / trainer mismatch correction (issue 14): TIS and masking


def _plain_weights(old, sampled, mask, mode, cap):
    """The correction written out token by token (numpy, float64)."""
    b, t = old.shape
    out = np.zeros((b, t))
    for i in range(b):
        toks = [j for j in range(t) if mask[i, j]]
        ratios = {j: math.exp(old[i, j] - sampled[i, j]) for j in toks}
        if mode == "sequence_mask" and toks:
            seq = math.exp(sum(old[i, j] - sampled[i, j] for j in toks) / len(toks))
        for j in toks:
            w = ratios[j]
            if mode == "tis":
                out[i, j] = min(w, cap)
            elif mode == "token_mask":
                out[i, j] = 1.0 if 1 / cap <= w <= cap else 0.0
            elif mode == "sequence_mask":
                out[i, j] = 1.0 if 1 / cap <= seq <= cap else 0.0
            else:
                out[i, j] = 1.0
    return out


@pytest.mark.parametrize("mode", ["off", "tis", "token_mask", "sequence_mask"])
def test_importance_weights_match_a_plain_rederivation(mode):
    from r1jax.train.losses import importance_weights

    rng = np.random.default_rng(7)
    old = rng.normal(-2.0, 1.0, (6, 9))
    sampled = old + rng.normal(0.0, 0.6, (6, 9))  # log-ratios of either sign, some beyond log 1.5
    mask = (rng.random((6, 9)) < 0.7).astype(np.float32)
    mask[0] = 0  # a row with no response tokens
    sampled[1] = old[1] - 1.0  # a sequence the sampler drew far from pi_old: its mean ratio is e
    cap = 1.5
    w, stats = importance_weights(jnp.asarray(old, jnp.float32), jnp.asarray(sampled, jnp.float32),
                                  jnp.asarray(mask), mode, cap)
    want = _plain_weights(old, sampled, mask, mode, cap)
    np.testing.assert_allclose(np.asarray(w), want, rtol=1e-5, atol=1e-6)
    ratios = np.exp(old - sampled)[mask > 0]
    assert float(stats["is_ratio_mean"]) == pytest.approx(ratios.mean(), rel=1e-5)
    assert float(stats["is_ratio_max"]) == pytest.approx(ratios.max(), rel=1e-5)
    corrected = {"off": 0.0, "tis": np.mean(ratios > cap),
                 "token_mask": np.mean(want[mask > 0] == 0), "sequence_mask": np.mean(want[mask > 0] == 0)}[mode]
    assert float(stats["is_corrected_share"]) == pytest.approx(corrected, abs=1e-6)
    if mode != "off":
        assert 0 < corrected < 1  # the inputs exercise the correction


def test_policy_objective_weights_the_clipped_term_of_each_token():
    """l_t = -w_t min(r A, clip(r) A) (+ beta KL unweighted), token-mean: re-derived per token."""
    rng = np.random.default_rng(8)
    logp, old = rng.normal(-2, 0.3, (3, 5)), rng.normal(-2, 0.3, (3, 5))
    ref = rng.normal(-2, 0.3, (3, 5))
    adv, mask = rng.normal(size=3), (rng.random((3, 5)) < 0.8).astype(np.float32)
    w = rng.uniform(0, 2, (3, 5)) * mask
    loss, _ = policy_objective(*(jnp.asarray(a, jnp.float32) for a in (logp, old, adv, mask)), clip_low=0.2,
                               clip_high=0.28, ref_logp=jnp.asarray(ref, jnp.float32), beta=0.1,
                               aggregation="token-mean", is_weight=jnp.asarray(w, jnp.float32))
    total = 0.0
    for i, j in itertools.product(range(3), range(5)):
        if mask[i, j]:
            r = math.exp(logp[i, j] - old[i, j])
            term = -min(r * adv[i], min(max(r, 0.8), 1.28) * adv[i]) * w[i, j]
            kl = math.exp(ref[i, j] - logp[i, j]) - (ref[i, j] - logp[i, j]) - 1  # k3
            total += term + 0.1 * kl
    assert float(loss) == pytest.approx(total / mask.sum(), rel=1e-5)


def test_sampler_logprobs_land_on_the_response_targets():
    """New token j of row i sits at target position plen_i - 1 + j: exactly the response mask of
    the training rows, in order."""
    from r1jax.stages.grpo import sampler_logp_rows

    plens, totals, width, new = np.array([3, 5, 2]), np.array([7, 6, 2]), 9, 5
    tokens = np.arange(3 * width).reshape(3, width) % 17 + 1
    rows = rollout_batch(jnp.asarray(tokens), jnp.asarray(plens), jnp.asarray(totals))
    logp = -np.arange(1, 3 * new + 1, dtype=np.float32).reshape(3, new)
    placed, mask = sampler_logp_rows(jnp.asarray(logp), jnp.asarray(plens), jnp.asarray(totals - plens), width)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(rows["response_mask"]))
    for i in range(3):
        got = np.asarray(placed)[i][np.asarray(mask)[i] > 0]
        np.testing.assert_array_equal(got, logp[i, :totals[i] - plens[i]])
