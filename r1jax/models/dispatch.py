"""All-to-all expert dispatch: each (token, choice) row travels to the shard that holds its expert
and back, in receive buffers of bounded size, dropping nothing.

Runs inside `shard_map`, per device of an expert-parallel group of `ep` shards (the mesh axes that
shard both the experts and the tokens). A device holds T tokens with k choices each, N = T k rows,
and the e_loc experts ep_index * e_loc .. (ep_index + 1) * e_loc - 1.

  1. Sort the rows by expert id (= destination shard * e_loc + local expert), so the rows for
     each destination are contiguous and, within it, grouped by local expert. Count them:
     counts [ep, e_loc]; all-gather the counts, so every device knows the whole matrix
     C[sender, receiver, local expert] (ep^2 e_loc integers).
  2. Receiver j reads its rows as one stream, sender-major: sender 0's rows for j (by local
     expert), then sender 1's, ... Round r carries the window [r W, (r + 1) W) of that stream,
     W = ceil(model.moe_capacity * N) rows: a buffer of a configured multiple of the rows a shard
     receives on average, whatever the routing. R = ceil(max_j rows_j / W) rounds run (the same
     count on every device); a round beyond the first is an "extra round", counted in the
     metrics. Nothing is dropped: a skewed batch costs rounds, not tokens.
  3. Per round: a ragged all-to-all moves each sender's part of the window into the receiver's
     [W, d] buffer; the receiver sorts the window by local expert, runs the dropless grouped
     matmul (models/gmm.py), unsorts, and a reverse ragged all-to-all writes every result row back
     to its place in the sender's sorted [N, d] buffer.
  4. The caller weights, unsorts and sums the k rows of each token (models/moe.py).

The rounds run in a `lax.while_loop` (their number depends on the routing), which reverse-mode
autodiff cannot differentiate, so the exchange and expert FFN together are one `custom_vjp`: the
backward runs the same rounds, moving the inputs and the output cotangents to the experts,
recomputing each window's FFN under `jax.vjp`, summing the weight gradients in float32 and sending
the input cotangents back. It stores nothing per round.

Communication per layer and device, each way (forward; the backward moves x and dy out and dx
back): the rows that leave the device, about N (ep - 1) / ep = k T (ep - 1) / ep rows of d, plus
the counts. Memory: the [W, d] window with its [W, d_ff] hidden, and the [N, d] sorted inputs and
outputs, independent of ep (the gather dispatch holds ep T tokens and ep N rows).

XLA:CPU has no ragged all-to-all. `ragged_exchange` lowers `jax.lax.ragged_all_to_all` on every
other platform and, on CPU, an emulation with the same semantics from `ppermute`: one shift per
peer, each moving a chunk of min(N, W) rows and their destination rows, scattered in place. Its
window and row buffers have the real op's shapes; its chunks (up to ep of them live) are extra.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def window_rows(n_rows: int, capacity: float) -> int:
    """W, the receive-buffer rows of one round: ceil(capacity * N), at least 1."""
    return max(1, math.ceil(capacity * n_rows))


def round_plan(counts: jax.Array, r: jax.Array, rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Who sends what in round r. counts [ep, ep, e_loc] (sender, receiver, local expert).

    Returns int32 [ep, ep] arrays indexed (sender i, receiver j): size, the rows i sends j in this
    round; src, the first of them in i's sorted buffer; dst, where they start in j's window
    (offsets are 0 where size is 0)."""
    tot = counts.sum(-1)  # [i, j]: all rows i sends j
    stream = jnp.cumsum(tot, 0) - tot  # where i's block starts in j's stream (sender-major)
    buffer = jnp.cumsum(tot, 1) - tot  # where j's block starts in i's sorted buffer
    lo = r * rows
    start = jnp.clip(stream, lo, lo + rows)
    size = jnp.clip(stream + tot, lo, lo + rows) - start
    src = jnp.where(size > 0, buffer + start - stream, 0)
    dst = jnp.where(size > 0, start - lo, 0)
    return size.astype(jnp.int32), src.astype(jnp.int32), dst.astype(jnp.int32)


def window_experts(counts: jax.Array, me: jax.Array, r: jax.Array, rows: int) -> jax.Array:
    """The local expert of each row of receiver `me`'s window in round r, [rows] int32; e_loc for
    rows past the end of its stream."""
    e_loc = counts.shape[-1]
    cum = jnp.cumsum(counts[:, me, :].reshape(-1))  # the stream: sender-major, then local expert
    v = r * rows + jnp.arange(rows)
    idx = jnp.searchsorted(cum, v, side="right")
    return jnp.where(v < cum[-1], idx % e_loc, e_loc).astype(jnp.int32)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name, ep: int):
    """`jax.lax.ragged_all_to_all` (one slice per peer) from ppermute, for XLA:CPU.

    For each shift s, device i sends device (i + s) % ep the chunk of min(len(operand), len(output))
    rows starting at input_offsets[dst] with the rows of the receiver's output they go to (past
    send_sizes[dst]: out of range, dropped by the scatter). An optimization barrier ties each chunk
    to the previous scatter; XLA:CPU still keeps up to ep chunks live (measured in
    tests/test_moe_dispatch.py; the real op has none). recv_sizes is implied by the senders."""
    del recv_sizes
    m = min(operand.shape[0], output.shape[0])
    me = jax.lax.axis_index(axis_name)
    rows = jnp.arange(m, dtype=jnp.int32)
    for s in range(ep):
        dst = (me + s) % ep
        operand, output = jax.lax.optimization_barrier((operand, output))
        chunk = operand[jnp.minimum(input_offsets[dst] + rows, operand.shape[0] - 1)]
        where = jnp.where(rows < send_sizes[dst], output_offsets[dst] + rows, output.shape[0])
        if s:
            perm = [(i, (i + s) % ep) for i in range(ep)]
            chunk, where = jax.lax.ppermute((chunk, where), axis_name, perm)
        output = output.at[where].set(chunk, mode="drop")
    return output


def ragged_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name, ep: int):
    """`jax.lax.ragged_all_to_all` semantics with one slice per peer: on CPU the ppermute
    emulation, elsewhere the real collective (chosen at lowering, so `jax.export` for TPU or GPU
    carries the real op)."""
    args = (operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
    real = functools.partial(jax.lax.ragged_all_to_all, axis_name=axis_name)
    emulated = functools.partial(_emulated_ragged_all_to_all, axis_name=axis_name, ep=ep)
    return jax.lax.platform_dependent(*args, cpu=emulated, default=real)


def _to_experts(xs, plan, me, rows, axis_name, ep):
    """Round's window of receiver `me`: [rows, d], from every sender's sorted buffer."""
    size, src, dst = plan
    window = jnp.zeros((rows, xs.shape[1]), xs.dtype)
    return ragged_exchange(xs, window, src[me], size[me], dst[me], size[:, me], axis_name=axis_name, ep=ep)


def _from_experts(window, out, plan, me, axis_name, ep):
    """The reverse: each row of `me`'s window back to its place in its sender's [N, d] `out`."""
    size, src, dst = plan
    return ragged_exchange(window, out, dst[:, me], size[:, me], src[:, me], size[me], axis_name=axis_name, ep=ep)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def exchange_ffn(static, xs, counts, rounds, w_gate, w_up, w_down):
    """Rows xs [N, d] sorted by expert id -> FFN of each row's expert, [N, d] in xs.dtype.

    static: (axis_name, ep, rows W, ffn), ffn(x [W, d], local expert [W], w_gate, w_up, w_down) the
    dropless FFN of one window (rows whose local expert is e_loc are not computed); counts [ep, ep, e_loc] (the gathered
    count matrix); rounds: int32 scalar, R; w_* this device's experts [e_loc, d, f], [e_loc, f, d]."""
    return _forward(static, xs, counts, rounds, w_gate, w_up, w_down)


def _forward(static, xs, counts, rounds, w_gate, w_up, w_down):
    axis_name, ep, rows, ffn = static
    me = jax.lax.axis_index(axis_name)

    def one_round(r, ys):
        plan = round_plan(counts, r, rows)
        xw = _to_experts(xs, plan, me, rows, axis_name, ep)
        yw = ffn(xw, window_experts(counts, me, r, rows), w_gate, w_up, w_down)
        return _from_experts(yw, ys, plan, me, axis_name, ep)

    return jax.lax.fori_loop(0, rounds, one_round, jnp.zeros_like(xs))


def _exchange_ffn_fwd(static, xs, counts, rounds, w_gate, w_up, w_down):
    return _forward(static, xs, counts, rounds, w_gate, w_up, w_down), (xs, counts, rounds, w_gate, w_up, w_down)


def _exchange_ffn_bwd(static, res, dys):
    axis_name, ep, rows, ffn = static
    xs, counts, rounds, w_gate, w_up, w_down = res
    me = jax.lax.axis_index(axis_name)
    weights = (w_gate, w_up, w_down)
    x_dy = jnp.concatenate([xs, dys.astype(xs.dtype)], 1)  # inputs and output cotangents: one exchange

    def one_round(r, carry):
        dxs, dws = carry
        plan = round_plan(counts, r, rows)
        xw, dyw = jnp.split(_to_experts(x_dy, plan, me, rows, axis_name, ep), 2, axis=1)
        local = window_experts(counts, me, r, rows)
        _, vjp = jax.vjp(lambda x, *w: ffn(x, local, *w), xw, *weights)
        dxw, *dw = vjp(dyw)
        dxs = _from_experts(dxw.astype(xs.dtype), dxs, plan, me, axis_name, ep)
        return dxs, tuple(a + g.astype(jnp.float32) for a, g in zip(dws, dw))

    zeros = tuple(jnp.zeros(w.shape, jnp.float32) for w in weights)
    dxs, dws = jax.lax.fori_loop(0, rounds, one_round, (jnp.zeros_like(xs), zeros))
    return (dxs, None, None, *(g.astype(w.dtype) for g, w in zip(dws, weights)))


exchange_ffn.defvjp(_exchange_ffn_fwd, _exchange_ffn_bwd)


def routed_experts_all_to_all(x, experts, weights, w_gate, w_up, w_down, ffn, *, axis_name, ep: int,
                              capacity: float, all_axes: tuple[str, ...] = ()):
    """Inside shard_map: this device's tokens x [T, d] with choices experts/weights [T, k] (global
    expert ids), its experts w_gate, w_up [e_loc, d, f], w_down [e_loc, f, d] on shard
    axis_index(axis_name) of `ep`; ffn as in `exchange_ffn`. Returns (sum_k weight * FFN_expert(x) [T, d] in x.dtype, the
    number of rounds R as an int32 scalar, the max over `all_axes`)."""
    t, k = experts.shape
    e_loc = w_gate.shape[0]
    rows = window_rows(t * k, capacity)
    with jax.named_scope("dispatch"):
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)  # by destination shard, then local expert
        xs = x[order // k]  # [N, d]
        counts = jnp.bincount(flat, length=ep * e_loc).astype(jnp.int32).reshape(ep, e_loc)
        counts = jax.lax.all_gather(counts, axis_name)  # [sender, receiver, local expert]
        rounds = (jnp.max(counts.sum((0, 2))) + rows - 1) // rows
        if all_axes:
            rounds = jax.lax.pmax(rounds, all_axes)
    with jax.named_scope("experts"):
        ys = exchange_ffn((axis_name, ep, rows, ffn), xs, counts, rounds.astype(jnp.int32), w_gate, w_up, w_down)
    with jax.named_scope("combine"):
        ys = ys.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        return ys[inverse].reshape(t, k, -1).sum(1).astype(x.dtype), rounds.astype(jnp.int32)
