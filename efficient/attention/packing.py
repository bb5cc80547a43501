"""Packing of unsigned b-bit integer codes into bytes (b in 2, 4, 8)."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Int, UInt8

QUANT_BITS = (2, 4, 8)


def pack_codes(codes: Int[Array, "... H"], bits: int) -> UInt8[Array, "... Hp"]:
    """Pack unsigned `bits`-bit codes along the last axis, 8 // bits per byte, low bits first."""
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits!r}")
    per = 8 // bits
    c = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    return jnp.sum(c << shifts, axis=-1, dtype=jnp.uint8)  # disjoint bits: sum == or


def unpack_codes(packed: UInt8[Array, "... Hp"], bits: int) -> Int[Array, "... H"]:
    """Inverse of `pack_codes`: uint8 codes [..., Hp * 8 // bits]."""
    per = 8 // bits
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    codes = (packed[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)
