"""Plain-jnp oracle for decode attention over a KIVI-quantized cache (same signature).

KIVI (Liu et al. 2024) stores b-bit codes: keys per channel with one (scale, zero)
per group of g consecutive token slots, values per token with one per group of g
channels. The codes are packed along H into uint8, 8 // b per byte, low bits
first (`efficient.attention.views.pack_codes`; this package imports jax only, so
the unpacking is reimplemented here and tested equal to `views.unpack_codes`).
Dequantization is `code * scale + zero` in float32 (bfloat16 scales are upcast
first). Slots s >= lengths[b] are empty: whatever they hold (NaN scales
included) is replaced by zeros before the exact attention of
`decode_attention_reference`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, UInt8

from kernels_pallas.decode_attention.reference import decode_attention_reference

BITS = (2, 4, 8)


def unpack_codes(packed: UInt8[Array, "... Hp"], bits: int) -> Int[Array, "... H"]:
    """uint8 [..., Hp] -> int32 codes [..., Hp * 8 // bits]; code h is bits
    (h % per) * bits .. of byte h // per (per = 8 // bits), low bits first."""
    per = 8 // bits
    shifts = jnp.arange(per, dtype=jnp.int32) * bits
    codes = (packed.astype(jnp.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def dequantize_keys(
    codes: UInt8[Array, "B S K Hp"], scale: Float[Array, "B Sg K H"], zero: Float[Array, "B Sg K H"], *,
    bits: int, group_size: int,
) -> Float[Array, "B S K H"]:
    """Per-channel keys: one (scale, zero) per channel and group of g token slots."""
    rep = lambda x: jnp.repeat(x.astype(jnp.float32), group_size, axis=1)  # noqa: E731
    return unpack_codes(codes, bits).astype(jnp.float32) * rep(scale) + rep(zero)


def dequantize_values(
    codes: UInt8[Array, "B S K Hp"], scale: Float[Array, "B S K Hg"], zero: Float[Array, "B S K Hg"], *,
    bits: int, group_size: int,
) -> Float[Array, "B S K H"]:
    """Per-token values: one (scale, zero) per token and group of g channels."""
    rep = lambda x: jnp.repeat(x.astype(jnp.float32), group_size, axis=3)  # noqa: E731
    return unpack_codes(codes, bits).astype(jnp.float32) * rep(scale) + rep(zero)


def quantized_decode_attention_reference(
    q: Float[Array, "B T N H"],
    k_codes: UInt8[Array, "B S K Hp"] | UInt8[Array, "B K S Hp"],
    k_scale: Float[Array, "B Sg K H"] | Float[Array, "B K Sg H"],
    k_zero: Float[Array, "B Sg K H"] | Float[Array, "B K Sg H"],
    v_codes: UInt8[Array, "B S K Hp"] | UInt8[Array, "B K S Hp"],
    v_scale: Float[Array, "B S K Hg"] | Float[Array, "B K S Hg"],
    v_zero: Float[Array, "B S K Hg"] | Float[Array, "B K S Hg"],
    lengths: Int[Array, " B"],
    *,
    bits: int,
    group_size: int,
    q_positions: Int[Array, "B T"] | None = None,
    kv_positions: Int[Array, "B S"] | None = None,
    mask: Bool[Array, "B T S"] | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    block_kv: int | None = None,
    kv_layout: str = "BSKH",
    interpret: object = False,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Dequantize the whole cache (float32), then exact attention: (out in q.dtype, lse
    float32); a fully masked row gives out 0 and lse -inf. kv_layout "BKSH": the six
    cache arrays are head-major [B, K, S|S/g, ...]. block_kv/interpret are ignored."""
    del block_kv, interpret
    if kv_layout == "BKSH":
        k_codes, k_scale, k_zero, v_codes, v_scale, v_zero = (
            jnp.swapaxes(x, 1, 2) for x in (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
        )
    quant = dict(bits=bits, group_size=group_size)
    k = dequantize_keys(k_codes, k_scale, k_zero, **quant)
    v = dequantize_values(v_codes, v_scale, v_zero, **quant)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, k.shape[1])
    live = (jnp.arange(k.shape[1])[None, :] < lengths[:, None])[:, :, None, None]  # B S 1 1
    k, v = jnp.where(live, k, 0.0), jnp.where(live, v, 0.0)  # empty slots may hold NaN scales
    out, lse = decode_attention_reference(
        q, k, v, lengths=lengths, q_positions=q_positions, kv_positions=kv_positions, mask=mask,
        causal=causal, window=window, softcap=softcap, scale=scale, return_lse=True,
    )
    return out, lse
