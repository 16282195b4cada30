"""Logit distillation: token-level divergences and the update `distill_step(state, teacher, batch, rng)`.

A teacher (e.g. the MoE R1) and a student (e.g. a dense Qwen2.5 / Llama 3 shape) that share a
tokenizer are run on the same packed batch (keys as in `sft.BATCH_KEYS`); the student minimises,
per trained token (loss_mask), a divergence D(p_T || p_S) between the teacher's and its own
next-token distributions (supervised KD in the terms of GKD, Agarwal et al. 2024):

  forward_kl   KL(P || Q) = sum_v P log(P / Q)                      (mode covering)
  reverse_kl   KL(Q || P) = sum_v Q log(Q / P)                      (mode seeking)
  jsd          JSD(beta)(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q

with P the teacher and Q the student, GKD's convention (its token-level D(p_T || p_S^theta)):
JSD(beta) / beta -> KL(P || Q) (forward) as beta -> 0 and JSD(beta) / (1 - beta) -> KL(Q || P)
(reverse) as beta -> 1; JSD(beta) <= h(beta) = -beta log beta - (1 - beta) log(1 - beta) (log 2 at 1/2).

Both distributions are softened by a temperature tau (P = softmax(t / tau), Q = softmax(s / tau)).
Hinton et al. (2015) multiply the soft loss by tau^2 so that its gradient keeps its size as tau
changes; here that is the flag `tau_sq_scale`, off by default so that the reported loss is the
divergence itself (the two agree at tau = 1).

Vocabularies: model vocab rows may be padded beyond the tokenizer's. Only the first `vocab` columns
(the tokenizer size, or the smaller of the two models' vocabularies) are compared: both
distributions are renormalised over those columns and the student's padded rows get no gradient.

Top-k teacher: the teacher may be given as (topk_logprobs [B, S, K], topk_ids [B, S, K]), its K most
likely tokens (see `teacher_topk`). The teacher distribution is then its top-k renormalised, and the
student's distribution is its log-probs gathered on the same ids and renormalised over those K
(the usual top-k logit distillation): the divergence is between two distributions over K tokens,
and student mass outside the teacher's top-k is neither rewarded nor penalised.

Teacher zeros: a teacher probability of exactly 0 (a -inf logit) contributes 0 log 0 = 0 to forward
KL and to the P-terms of JSD. Reverse KL is infinite when the student (always > 0) puts mass where
the teacher has none; its teacher log-probs are therefore floored at LOGP_FLOOR = log(float32 tiny)
~ -87.3, the smallest log-probability a float32 probability vector can tell from zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from r1jax.sharding import constrain
from r1jax.train.losses import head_chunks, per_token_cross_entropy
from r1jax.train.sft import BATCH_KEYS
from r1jax.train.state import StepContext, TrainState
from r1jax.train.update import accumulate_gradients, apply_gradients, balance_term

Kind = Literal["forward_kl", "reverse_kl", "jsd"]
KINDS = ("forward_kl", "reverse_kl", "jsd")
LOGP_FLOOR = math.log(float(jnp.finfo(jnp.float32).tiny))  # ~ -87.34


def _columns(logits: jax.Array, vocab: int | None) -> jax.Array:
    """logits[..., :vocab] in float32 (all columns when vocab is None)."""
    if vocab is not None and vocab > logits.shape[-1]:
        raise ValueError(f"vocab={vocab} exceeds the logits' {logits.shape[-1]} columns")
    return logits[..., :vocab].astype(jnp.float32)


def teacher_topk(teacher_logits: jax.Array, k: int, tau: float = 1.0,
                 vocab: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The teacher's k most likely tokens at temperature tau.

    teacher_logits [..., V] -> (topk_logprobs [..., k] float32, log softmax(logits[..., :vocab] / tau)
    at those tokens, in decreasing order; topk_ids [..., k] int32). The log-probs are normalised over
    the whole (first `vocab` columns of the) vocabulary, as an inference server would return them;
    `distill_loss` renormalises them over the k.
    """
    logp = jax.nn.log_softmax(_columns(teacher_logits, vocab) / tau, axis=-1)
    if not 0 < k <= logp.shape[-1]:
        raise ValueError(f"top-k must be in [1, {logp.shape[-1]}], got {k}")
    values, ids = jax.lax.top_k(logp, k)
    return values, ids.astype(jnp.int32)


def _log_probs(student_logits, teacher, mask, tau, vocab):
    """(teacher log-probs, student log-probs) over the compared support, both [..., V or K] float32.

    Teacher rows at masked-out positions are replaced by zeros (uniform) so that an all -inf row
    there cannot produce a NaN that leaks into the gradient through a where."""
    keep = mask.astype(bool)[..., None]
    if isinstance(teacher, tuple):
        topk_logprobs, topk_ids = teacher
        lp = jax.nn.log_softmax(jnp.where(keep, topk_logprobs.astype(jnp.float32), 0.0), axis=-1)
        s = jnp.take_along_axis(student_logits, topk_ids, axis=-1).astype(jnp.float32)  # [..., K]
        return lp, jax.nn.log_softmax(s / tau, axis=-1)
    if vocab is None and teacher.shape[-1] != student_logits.shape[-1]:
        raise ValueError(f"teacher has {teacher.shape[-1]} vocab columns, student {student_logits.shape[-1]}: "
                         "pass vocab= (the tokenizer's size) to compare the shared columns")
    t = jnp.where(keep, _columns(teacher, vocab), 0.0)
    lp = jax.nn.log_softmax(t / tau, axis=-1)
    return lp, jax.nn.log_softmax(_columns(student_logits, vocab) / tau, axis=-1)


def token_divergence(lp: jax.Array, lq: jax.Array, kind: Kind, beta: float = 0.5) -> jax.Array:
    """Per-position divergence between teacher P = exp(lp) and student Q = exp(lq), [..., V] -> [...].

    lp may hold -inf (teacher zeros); lq must be finite. See the module docstring for each kind.
    """
    p = jnp.exp(lp)
    q = jnp.exp(lq)
    support = lp > -jnp.inf
    lp_safe = jnp.where(support, lp, 0.0)
    if kind == "forward_kl":
        return jnp.sum(jnp.where(support, p * (lp_safe - lq), 0.0), axis=-1)
    if kind == "reverse_kl":
        return jnp.sum(q * (lq - jnp.maximum(lp, LOGP_FLOOR)), axis=-1)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"JSD beta must be in (0, 1), got {beta}")
        lm = jnp.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)  # log M, finite where Q > 0
        kl_pm = jnp.sum(jnp.where(support, p * (lp_safe - lm), 0.0), axis=-1)
        kl_qm = jnp.sum(q * (lq - lm), axis=-1)
        return beta * kl_pm + (1.0 - beta) * kl_qm
    raise ValueError(f"unknown distillation loss {kind!r}; expected one of {KINDS}")


def distill_sum(student_logits: jax.Array, teacher: jax.Array | tuple[jax.Array, jax.Array], mask: jax.Array, *,
                kind: Kind = "forward_kl", beta: float = 0.5, tau: float = 1.0, tau_sq_scale: bool = False,
                vocab: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum over masked positions of the divergence [x tau^2], number of masked positions), float32.

    The summed form of `distill_loss`, for accumulating over microbatches."""
    lp, lq = _log_probs(student_logits, teacher, mask, tau, vocab)
    return _masked_total(token_divergence(lp, lq, kind, beta), mask, tau if tau_sq_scale else 1.0)


def _masked_total(div: jax.Array, mask: jax.Array, tau: float) -> tuple[jax.Array, jax.Array]:
    """(sum of div [...] over mask x tau^2, number of masked positions)."""
    keep = mask.astype(bool)
    total = jnp.sum(jnp.where(keep, div, 0.0))
    if tau != 1.0:
        total = total * tau ** 2
    return total, jnp.sum(keep.astype(jnp.float32))


def distill_loss(student_logits: jax.Array, teacher: jax.Array | tuple[jax.Array, jax.Array], mask: jax.Array, *,
                 kind: Kind = "forward_kl", beta: float = 0.5, tau: float = 1.0, tau_sq_scale: bool = False,
                 vocab: int | None = None) -> tuple[jax.Array, dict]:
    """Token-mean distillation divergence D(teacher || student) over `mask`.

    student_logits [B, S, Vs]; teacher either logits [B, S, Vt] (softened by tau here) or the top-k
    form (topk_logprobs [B, S, K], topk_ids [B, S, K]) of `teacher_topk`, whose log-probs are already
    at temperature tau (only the student is softened here); mask [B, S] bool or 0/1. `vocab`: compare
    the first `vocab` columns (required when Vs != Vt with full teacher logits; the top-k form's ids
    index the student's logits directly and are already < vocab). kind, beta, tau,
    tau_sq_scale: see the module docstring. Returns (loss scalar, {"distill_loss", "tokens"}).
    """
    total, n = distill_sum(student_logits, teacher, mask, kind=kind, beta=beta, tau=tau, tau_sq_scale=tau_sq_scale,
                           vocab=vocab)
    loss = total / jnp.maximum(n, 1.0)
    return loss, {"distill_loss": loss, "tokens": n}


# --------------------------------------------------------------------------------------------------
# The update function
# --------------------------------------------------------------------------------------------------


def chunked_distill_terms(student_h: jax.Array, student_head: Callable[[jax.Array], jax.Array],
                          teacher_h: jax.Array, teacher_head: Callable[[jax.Array], jax.Array], targets: jax.Array,
                          mask: jax.Array, chunk: int, *, kind: Kind = "forward_kl", beta: float = 0.5,
                          tau: float = 1.0, vocab: int | None = None, top_k: int = 0) -> tuple[jax.Array, jax.Array]:
    """Per-position divergence and hard-label cross-entropy [B, S], float32, from the two models'
    final hidden states without a [B, S, vocab] array of either model.

    student_h [B, S, d_s], teacher_h [B, S, d_t] (`__call__(..., logits=False)`), each with its
    model's head ([B, C, d] -> [B, C, V] float32); targets, mask [B, S]. The teacher's chunk and
    the student's chunk are computed together, chunk by chunk (`losses.head_chunks`, `chunk` tokens):
    teacher logits (no gradient) -> its top-k when top_k > 0 (`teacher_topk`, kept for the backward,
    so only the full-logits teacher's head is recomputed there) -> `token_divergence` with the
    student's; the cross-entropy is the student's on the first `vocab` columns. Positions outside
    `mask` hold values that the sums must drop (`jnp.where(mask, ...)`, as `distill_sum` does).
    """

    def fn(s_logits, t_h, t, m):
        t_logits = jax.lax.stop_gradient(teacher_head(t_h))
        teacher = t_logits
        if top_k:
            teacher = tuple(checkpoint_name(x, "teacher_topk") for x in teacher_topk(t_logits, top_k, tau, vocab))
        lp, lq = _log_probs(s_logits, teacher, m, tau, vocab)
        return token_divergence(lp, lq, kind, beta), per_token_cross_entropy(s_logits[..., :vocab], t)

    saved = ("teacher_topk",) if top_k else ()
    return head_chunks(fn, student_head, student_h, (jax.lax.stop_gradient(teacher_h), targets, mask), chunk, saved)


def _objective(params, bias, teacher, batch, norm, *, ctx: StepContext, loss_kw: dict, top_k: int,
               ce_weight: float):
    """Student objective of one microbatch: distill_sum / tokens + ce_weight * CE (+ balance if MoE).
    teacher: (hidden [b, S, d_t], head) of the teacher's forward on the microbatch."""
    model = nnx.merge(ctx.graphdef, params, bias)
    h, aux = model(batch["tokens"], batch["positions"], batch["segment_ids"], logits=False)  # [b, S, d_s]
    kw = {k: loss_kw[k] for k in ("kind", "beta", "tau", "vocab")}
    div, ce = chunked_distill_terms(h, model.head, *teacher, batch["targets"], batch["loss_mask"],
                                    ctx.model.logits_chunk, top_k=top_k, **kw)
    d_sum, n = _masked_total(div, batch["loss_mask"], loss_kw["tau"] if loss_kw["tau_sq_scale"] else 1.0)
    ce_sum = jnp.sum(ce * batch["loss_mask"].astype(jnp.float32))
    objective = (d_sum + ce_weight * ce_sum) / norm["tokens"]
    stats = {"distill_sum": d_sum, "ce_sum": ce_sum, "tokens": n}
    if ctx.model.is_moe:
        term, more = balance_term(aux, ctx.balance_loss_coef, norm["micro"])
        objective += term
        stats.update(more)
    return objective, stats


def distill_step(state: TrainState, teacher_params: nnx.State, teacher_bias: nnx.State, batch: dict,
                 rng: jax.Array, *, ctx: StepContext, teacher_graphdef: nnx.GraphDef, vocab: int,
                 kind: Kind = "forward_kl", beta: float = 0.5, tau: float = 1.0, tau_sq_scale: bool = False,
                 top_k: int = 0, ce_weight: float = 0.0) -> tuple[TrainState, dict]:
    """One optimizer step of logit distillation of the student `state` from a fixed teacher.

    teacher_params / teacher_bias: the teacher's nnx.Param and RouterBias states for
    `teacher_graphdef` (an empty State for a dense teacher); read only, under stop_gradient (the
    teacher gets no gradient and no update). batch: packed [B, S] arrays (sft BATCH_KEYS).
    vocab: the number of leading vocab columns the two models share (the tokenizer's size).
    top_k > 0 distils from the teacher's top-k renormalised (`teacher_topk`), 0 from its full
    distribution. ce_weight mixes in the hard-label cross-entropy on `targets` (same token mean).

    Objective: [distill_loss + ce_weight * CE] + balance_loss_coef * balance (MoE student), summed
    over ctx.grad_accum microbatches (the teacher runs per microbatch; both models' logits come
    chunk by chunk of the student's model.logits_chunk tokens, `chunked_distill_terms`, so no
    [B, S, vocab] array of either exists). The student's MTP modules
    are not trained here. A MoE student's router biases move by the aux-loss-free rule as in sft_step.
    Jit with ctx, teacher_graphdef and the loss settings bound (functools.partial). `rng` is unused.
    Metrics: loss (the distillation divergence, token mean), ce, objective, grad_norm, lr, tokens,
    seq_tokens (+ balance_loss, load_max_over_mean, moe_extra_rounds for a MoE student).
    """
    del rng
    batch = {k: constrain(batch[k], ("batch", "length")) for k in BATCH_KEYS}
    a = ctx.grad_accum
    norm = {"tokens": jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0), "micro": float(a)}
    loss_kw = {"kind": kind, "beta": beta, "tau": tau, "tau_sq_scale": tau_sq_scale, "vocab": vocab}
    teacher_params, teacher_bias = jax.lax.stop_gradient((teacher_params, teacher_bias))

    def teacher_forward(mb):
        teacher = nnx.merge(teacher_graphdef, teacher_params, teacher_bias)
        h, _ = teacher(mb["tokens"], mb["positions"], mb["segment_ids"], logits=False)
        return jax.lax.stop_gradient(h), teacher.head  # [b, S, d_t]; the logits come chunk by chunk

    def loss_fn(params, mb):
        return _objective(params, state.router_bias, teacher_forward(mb), mb, norm, ctx=ctx, loss_kw=loss_kw,
                          top_k=top_k, ce_weight=ce_weight)

    grads, totals = accumulate_gradients(loss_fn, state.params, batch, a)
    new_state, metrics = apply_gradients(state, grads, totals, ctx=ctx)
    metrics.update(loss=totals["distill_sum"] / norm["tokens"], ce=totals["ce_sum"] / norm["tokens"],
                   objective=totals["objective"], tokens=totals["tokens"],
                   seq_tokens=jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32)))
    return new_state, metrics
