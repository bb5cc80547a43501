"""Asymmetric min-max integer quantization of key/value groups (KIVI, Liu et al. 2024).

A group of values x is stored as b-bit codes c = round((x - min) / scale) with
scale = (max - min) / (2^b - 1) and zero = min, dequantized as c * scale + zero;
every element is reconstructed within scale / 2 (plus the rounding of scale and
zero to their storage dtype). KIVI's grouping: keys per channel over groups of g
consecutive tokens (outlier channels get their own range), values per token over
groups of g channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, UInt8

from efficient.attention.views import QUANT_BITS, pack_codes


def check_bits(bits: object, caller: str) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in QUANT_BITS:
        raise ValueError(f"{caller}: bits={bits!r} cannot be packed into bytes; choose one of {QUANT_BITS}")
    return bits


def quantize_minmax(
    x: Float[Array, "... g"], bits: int, axis: int
) -> tuple[UInt8[Array, "... g"], Float[Array, "..."], Float[Array, "..."]]:
    """Codes (uint8, unpacked) of `x` with one scale/zero per slice along `axis` (float32;
    the reduced axis is dropped from scale and zero)."""
    x = x.astype(jnp.float32)
    lo = jnp.min(x, axis=axis)
    hi = jnp.max(x, axis=axis)
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round((x - jnp.expand_dims(lo, axis)) / jnp.expand_dims(safe, axis)), 0, levels)
    return codes.astype(jnp.uint8), scale, lo


def quantize_keys(
    k: Float[Array, "B F g K H"], bits: int
) -> tuple[UInt8[Array, "B F g K Hp"], Float[Array, "B F K H"], Float[Array, "B F K H"]]:
    """Keys per channel: F groups of g tokens, one scale/zero per (group, head, channel)."""
    codes, scale, zero = quantize_minmax(k, bits, axis=2)
    return pack_codes(codes, bits), scale, zero


def quantize_values(
    v: Float[Array, "B S K H"], bits: int, group_size: int
) -> tuple[UInt8[Array, "B S K Hp"], Float[Array, "B S K Hg"], Float[Array, "B S K Hg"]]:
    """Values per token: groups of g channels, one scale/zero per (token, head, group)."""
    b, s, kh, h = v.shape
    codes, scale, zero = quantize_minmax(v.reshape(b, s, kh, h // group_size, group_size), bits, axis=4)
    return pack_codes(codes.reshape(b, s, kh, h), bits), scale, zero


def error_bound(scale: jax.Array) -> jax.Array:
    """The largest reconstruction error of min-max rounding: half a quantization step."""
    return scale / 2


# ------------------------------------------------------------------ GEAR (Kang et al. 2024)


def split_outliers(
    x: Float[Array, "B F g K H"], count: int
) -> tuple[Float[Array, "B F g K H"], Float[Array, "B F K O"], jax.Array]:
    """GEAR's sparse part: per (group, head) the `count` entries farthest from the group's mean,
    kept exactly (values, and int16 indices into the flattened [g, H] block); the inliers
    get the mean at those entries, so the outliers do not stretch the quantization range."""
    b, f, g, kh, h = x.shape
    x = x.astype(jnp.float32)
    block = jnp.moveaxis(x, 3, 2).reshape(b, f, kh, g * h)  # B F K gH
    mean = jnp.mean(block, axis=-1, keepdims=True)
    _, index = jax.lax.top_k(jnp.abs(block - mean), count)
    values = jnp.take_along_axis(block, index, axis=-1)
    rows = jnp.indices(index.shape)
    inliers = block.at[rows[0], rows[1], rows[2], index].set(jnp.broadcast_to(mean, index.shape))
    inliers = jnp.moveaxis(inliers.reshape(b, f, kh, g, h), 2, 3)
    return inliers, values, index.astype(jnp.int16)


def _orthonormal_columns(y: Float[Array, "... H R"]) -> Float[Array, "... H R"]:
    """Gram-Schmidt on the R (few) columns: matmuls only (XLA:CPU's batched SVD/QR inside
    the layer scan took minutes for a 512-token prefill)."""
    cols = []
    for j in range(y.shape[-1]):
        c = y[..., j]
        for prev in cols:
            c = c - jnp.sum(c * prev, axis=-1, keepdims=True) * prev
        cols.append(c / jnp.maximum(jnp.linalg.norm(c, axis=-1, keepdims=True), 1e-12))
    return jnp.stack(cols, axis=-1)


def low_rank(error: Float[Array, "B F g K H"], rank: int, iterations: int = 4
             ) -> tuple[Float[Array, "B F g K R"], Float[Array, "B F K R H"]]:
    """GEAR's low-rank part: a rank-`rank` approximation error ~ a @ b of each (group, head)
    [g, H] block by subspace (power) iteration, as GEAR computes it: q spans the top right
    singular vectors after `iterations` rounds of q <- orth(E^T E q)."""
    block = jnp.moveaxis(error.astype(jnp.float32), 3, 2)  # B F K g H
    h = block.shape[-1]
    start = jnp.eye(h, rank, dtype=jnp.float32) + 0.01 * jnp.cos(jnp.arange(h * rank, dtype=jnp.float32)).reshape(h, rank)
    q = _orthonormal_columns(jnp.broadcast_to(start, (*block.shape[:3], h, rank)))
    for _ in range(iterations):
        q = _orthonormal_columns(jnp.einsum("...gh,...gr->...hr", block, block @ q))
    a = block @ q  # B F K g R
    return jnp.moveaxis(a, 2, 3), jnp.swapaxes(q, -1, -2)