"""Grouped matmul for dropless MoE: rows sorted by expert times that expert's weight.

    y[r] = x[r] @ w[g(r)]   for rows r of group g (groups are consecutive runs of rows);
    rows after sum(group_sizes) get 0.

`jax.lax.ragged_dot` is the natural op, but outside TPU, XLA (CPU, and CUDA in jaxlib 0.10) lowers
it to a dense masked product over every group: E times the FLOPs and an [E, rows, d] buffer.
`tiled_gmm` keeps the cost at the rows actually routed: rows are laid out group by group in
tiles of `tile` rows (each group padded to whole tiles, so every tile belongs to one group), and a
scan multiplies each used tile by its group's weight. Its VJP is written out: dx is the same
grouped product with transposed weights, dw accumulates x_tile^T dy_tile into its group, so the
backward pass stores nothing per tile. Padding costs less than one tile per group.

`grouped_matmul` picks ragged_dot on TPU (native grouped kernels) and the tiled form elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _layout(group_sizes: jax.Array, rows: int, tile: int):
    """Where each row goes in the tiled buffer and which group each tile belongs to."""
    e = group_sizes.shape[0]
    n_tiles = -(-rows // tile) + e  # enough for every group's partial last tile
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    padded = (group_sizes + tile - 1) // tile * tile
    pends = jnp.cumsum(padded)
    pstarts = pends - padded
    r = jnp.arange(rows)
    g = jnp.searchsorted(ends, r, side="right")  # the group of each row; e past the routed rows
    gi = jnp.minimum(g, e - 1)
    dest = jnp.where(g < e, pstarts[gi] + r - starts[gi], n_tiles * tile)  # out of range: dropped
    tile_group = jnp.searchsorted(pends, jnp.arange(n_tiles) * tile, side="right")
    used = tile_group < e
    return dest, jnp.minimum(tile_group, e - 1), used, n_tiles


def _tiled_forward(x, w, group_sizes, tile):
    x, w = jnp.asarray(x), jnp.asarray(w)
    rows, d = x.shape
    dest, tile_group, used, n_tiles = _layout(group_sizes, rows, tile)
    buf = jnp.zeros((n_tiles * tile, d), x.dtype).at[dest].set(x, mode="drop").reshape(n_tiles, tile, d)

    def body(_, inp):
        xt, gidx, u = inp
        yt = jax.lax.cond(u, lambda: jnp.dot(xt, w[gidx], preferred_element_type=jnp.float32).astype(x.dtype),
                          lambda: jnp.zeros((tile, w.shape[-1]), x.dtype))
        return None, yt

    _, out = jax.lax.scan(body, None, (buf, tile_group, used))
    return jnp.take(out.reshape(n_tiles * tile, -1), dest, axis=0, mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def tiled_gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, tile: int = 128) -> jax.Array:
    """Grouped matmul: x [rows, d] (sorted by group), w [E, d, f], group_sizes [E] int -> [rows, f]."""
    return _tiled_forward(x, w, group_sizes, tile)


def _fwd(x, w, group_sizes, tile):
    return _tiled_forward(x, w, group_sizes, tile), (x, w, group_sizes)


def _bwd(tile, res, dy):
    x, w, group_sizes = res
    x, w, dy = jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)
    dx = _tiled_forward(dy.astype(x.dtype), jnp.swapaxes(w, 1, 2), group_sizes, tile)
    rows, d = x.shape
    dest, tile_group, used, n_tiles = _layout(group_sizes, rows, tile)
    xb = jnp.zeros((n_tiles * tile, d), x.dtype).at[dest].set(x, mode="drop").reshape(n_tiles, tile, d)
    yb = jnp.zeros((n_tiles * tile, dy.shape[-1]), dy.dtype).at[dest].set(dy, mode="drop")
    yb = yb.reshape(n_tiles, tile, -1)

    def body(dw, inp):
        xt, yt, gidx, u = inp
        grad = jnp.dot(xt.T, yt, preferred_element_type=jnp.float32)
        return jax.lax.cond(u, lambda: dw.at[gidx].add(grad), lambda: dw), None

    dw, _ = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), (xb, yb, tile_group, used))
    return dx, dw.astype(w.dtype), None


tiled_gmm.defvjp(_fwd, _bwd)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, impl: str = "auto") -> jax.Array:
    """x [rows, d] sorted by group, w [E, d, f], group_sizes [E] -> [rows, f] (see module docstring).

    impl: "ragged_dot" | "tiled" | "auto" (ragged_dot on TPU, tiled elsewhere).
    """
    if impl == "auto":
        impl = "ragged_dot" if jax.default_backend() == "tpu" else "tiled"
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes)
    return tiled_gmm(x, w, group_sizes.astype(jnp.int32), tile_rows(x.shape[0], w.shape[0]))


def tile_rows(rows: int, groups: int, largest: int = 128, smallest: int = 8) -> int:
    """Tile height for `rows` rows over `groups` groups: about the rows per group (a power of two),
    clamped to [smallest, largest]. Each group pads to whole tiles, so a 128-row tile at decode time
    (a few rows per expert) would multiply mostly zeros; training batches get the full height."""
    per_group = max(rows // max(groups, 1), 1)
    return int(min(largest, max(smallest, 1 << (per_group - 1).bit_length())))
