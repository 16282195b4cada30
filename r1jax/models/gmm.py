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

On Hopper GPUs `mosaic_gmm` runs jax's Pallas Mosaic-GPU grouped kernels
(`jax.experimental.pallas.ops.gpu`: `ragged_dot_mgpu` for y and dx, `transposed_ragged_dot_mgpu`
for dw), one pass over the routed rows each, with a custom VJP; they need d_model and the expert
hidden size to be multiples of 128 (MOSAIC_BLOCKS), else the tiled form runs.

`grouped_matmul` picks ragged_dot on TPU (native grouped kernels), the Mosaic-GPU kernels on a
Hopper GPU where the shapes fit, and the tiled form elsewhere.
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


# Tiles of the Mosaic-GPU kernels (rows x columns x contraction), from the ranges their own
# benchmarks sweep on H100; the dims they tile must divide by them.
MOSAIC_BLOCKS = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def _mosaic_ragged(lhs, rhs, group_sizes, transpose_rhs=False):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes, transpose_rhs=transpose_rhs,
                                      **MOSAIC_BLOCKS)


def _mosaic_transposed(lhs, rhs, group_sizes):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    return transposed_ragged_dot_mgpu.transposed_ragged_dot(lhs, rhs, group_sizes=group_sizes, **MOSAIC_BLOCKS)


def _reference_ragged(lhs, rhs, group_sizes, transpose_rhs=False):
    return jax.lax.ragged_dot(lhs, jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs, group_sizes)


def _reference_transposed(lhs, rhs, group_sizes):
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, ragged_dot_dimension_numbers=dims)


# (y / dx kernel, dw kernel): the Mosaic-GPU ones, and XLA's ragged_dot with the same contracts
# (what the CPU tests run the custom VJP with; XLA lowers it densely outside TPU)
MOSAIC_GPU_KERNELS = (_mosaic_ragged, _mosaic_transposed)
REFERENCE_KERNELS = (_reference_ragged, _reference_transposed)


def _below_groups(rows: int, group_sizes: jax.Array) -> jax.Array:
    return (jnp.arange(rows) < jnp.sum(group_sizes))[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def mosaic_gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, kernels=MOSAIC_GPU_KERNELS) -> jax.Array:
    """Grouped matmul through grouped kernels: x [rows, d] sorted by group, w [E, d, f] -> [rows, f]
    in x.dtype; rows past sum(group_sizes) are 0 (the kernels leave them unwritten). Backward:
    dx = the same kernel against w transposed, dw [E, d, f] = the transposed (row-contracting)
    grouped kernel of x and dy."""
    return _mosaic_forward(x, w, group_sizes, kernels)


def _mosaic_forward(x, w, group_sizes, kernels):
    y = kernels[0](x, w.astype(x.dtype), group_sizes)
    return jnp.where(_below_groups(x.shape[0], group_sizes), y, 0).astype(x.dtype)


def _mosaic_fwd(x, w, group_sizes, kernels):
    return _mosaic_forward(x, w, group_sizes, kernels), (x, w, group_sizes)


def _mosaic_bwd(kernels, res, dy):
    x, w, group_sizes = res
    dy = dy.astype(x.dtype)
    dx = kernels[0](dy, w.astype(x.dtype), group_sizes, transpose_rhs=True)
    dx = jnp.where(_below_groups(x.shape[0], group_sizes), dx, 0).astype(x.dtype)
    dw = kernels[1](x, dy, group_sizes)
    return dx, dw.astype(w.dtype), None


mosaic_gmm.defvjp(_mosaic_fwd, _mosaic_bwd)


def mosaic_fits(d: int, f: int) -> bool:
    """Whether the Mosaic-GPU kernels tile x [rows, d] @ w [E, d, f] (both directions)."""
    b = MOSAIC_BLOCKS
    return all(n % b["block_n"] == 0 and n % b["block_m"] == 0 and n % b["block_k"] == 0 for n in (d, f))


def _is_hopper() -> bool:
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, impl: str = "auto") -> jax.Array:
    """x [rows, d] sorted by group, w [E, d, f], group_sizes [E] -> [rows, f] (see module docstring).

    impl: "ragged_dot" | "tiled" | "mosaic_gpu" | "auto" (ragged_dot on TPU, mosaic_gpu on a Hopper
    GPU where mosaic_fits, tiled elsewhere).
    """
    if impl == "auto":
        if jax.default_backend() == "tpu":
            impl = "ragged_dot"
        elif _is_hopper() and mosaic_fits(w.shape[1], w.shape[2]):
            impl = "mosaic_gpu"
        else:
            impl = "tiled"
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes)
    if impl == "mosaic_gpu":
        return mosaic_gmm(x, w, group_sizes.astype(jnp.int32))
    return tiled_gmm(x, w, group_sizes.astype(jnp.int32), tile_rows(x.shape[0], w.shape[0]))


def tile_rows(rows: int, groups: int, largest: int = 128, smallest: int = 8) -> int:
    """Tile height for `rows` rows over `groups` groups: about the rows per group (a power of two),
    clamped to [smallest, largest]. Each group pads to whole tiles, so a 128-row tile at decode time
    (a few rows per expert) would multiply mostly zeros; training batches get the full height."""
    per_group = max(rows // max(groups, 1), 1)
    return int(min(largest, max(smallest, 1 << (per_group - 1).bit_length())))
