"""ZipCache's mixed-precision codes (He et al. 2024, "ZipCache: Accurate and Efficient KV
Cache Quantization with Salient Token Identification") and the view attention reads.

Channel-separable tokenwise quantization (the paper's Sec. 4.1): in each group of g tokens
and KV head, every channel j is divided by c_j = sqrt(max_t |x[t, j]|), which evens out the
outlier channels, and each token of the normalised block then gets its own min-max scale and
zero over the H channels: H + 2g parameters per block where groupwise quantization would
store one pair per small channel group of every token. Keys and values both use it.

Mixed precision (Sec. 4.2-4.3): the cache ranks each group's tokens by a saliency score
(ZipCache's normalised attention score, computed by the cache) and gives the n_hi most salient
`hi_bits`, the other g - n_hi `lo_bits`. Each group stores its codes in saliency order
(salient first), so the two widths pack into fixed-shape arrays, plus the rank of every
token in that order (uint8) to put them back in token order when read.

Dequantized: x[t, j] = (code[t, j] * scale[t] + zero[t]) * c_j.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt8

from efficient.attention.packing import pack_codes, unpack_codes
from efficient.attention.store_view import ResidualStoreView

MIN_CHANNEL_SCALE = 1e-6  # c_j floor: an all-zero channel divides by this, not by zero


def _tokenwise(y: Float[Array, "B F n K H"], bits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Min-max codes of each token over its H channels: (packed, scale, zero [B, F, n, K])."""
    lo, hi = jnp.min(y, axis=-1), jnp.max(y, axis=-1)
    scale = (hi - lo) / (2**bits - 1)
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round((y - lo[..., None]) / safe[..., None]), 0, 2**bits - 1)
    return pack_codes(codes.astype(jnp.uint8), bits), scale, lo


def quantize_mixed(
    x: Float[Array, "B F g K H"], saliency: Float[Array, "B F g K"], *, salient: int, hi_bits: int, lo_bits: int,
) -> dict[str, jax.Array]:
    """Codes of F groups: hi [B, F, n_hi, K, H*hi/8], lo [B, F, g-n_hi, K, H*lo/8] (saliency
    order), token scale/zero [B, F*g, K] (saliency order), channel scale [B, F, K, H], and
    rank [B, F, K, g]: where each token of the group sits in saliency order."""
    b, f, g, kh, h = x.shape
    x = x.astype(jnp.float32)
    channel = jnp.sqrt(jnp.max(jnp.abs(x), axis=2))  # B F K H
    channel = jnp.maximum(channel, MIN_CHANNEL_SCALE)
    y = x / channel[:, :, None]
    order = jnp.argsort(-saliency.astype(jnp.float32), axis=2, stable=True)  # B F g K: token at each rank
    ranked = jnp.take_along_axis(y, order[..., None], axis=2)
    hi, hi_scale, hi_zero = _tokenwise(ranked[:, :, :salient], hi_bits)
    lo, lo_scale, lo_zero = _tokenwise(ranked[:, :, salient:], lo_bits)
    scale = jnp.concatenate([hi_scale, lo_scale], axis=2).reshape(b, f * g, kh)
    zero = jnp.concatenate([hi_zero, lo_zero], axis=2).reshape(b, f * g, kh)
    rank = jnp.argsort(order, axis=2).astype(jnp.uint8)  # B F g K
    return dict(hi=hi, lo=lo, token_scale=scale, token_zero=zero, channel_scale=channel,
                rank=jnp.swapaxes(rank, 2, 3))


def dequantize_mixed(
    hi: UInt8[Array, "B F n K Hh"], lo: UInt8[Array, "B F m K Hl"], token_scale: Float[Array, "B S K"],
    token_zero: Float[Array, "B S K"], channel_scale: Float[Array, "B F K H"], rank: UInt8[Array, "B F K g"],
    *, hi_bits: int, lo_bits: int,
) -> Float[Array, "B S K H"]:
    """Inverse of `quantize_mixed` (lossy): the F groups' tokens back in token order, float32."""
    b, f, kh, g = rank.shape
    codes = jnp.concatenate([unpack_codes(hi, hi_bits), unpack_codes(lo, lo_bits)], axis=2).astype(jnp.float32)
    scale = token_scale.astype(jnp.float32).reshape(b, f, g, kh, 1)
    zero = token_zero.astype(jnp.float32).reshape(b, f, g, kh, 1)
    ranked = codes * scale + zero  # B F g K H, saliency order
    y = jnp.take_along_axis(ranked, jnp.swapaxes(rank, 2, 3).astype(jnp.int32)[..., None], axis=2)
    x = y * channel_scale.astype(jnp.float32)[:, :, None]
    return x.reshape(b, f * g, kh, -1)


def mixed_code_bytes(head_dim: int, bits: int) -> int:
    return head_dim * bits // 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MixedPrecisionView(ResidualStoreView):
    """ZipCache's codes (module docstring) over S quantized slots, then a full-precision
    residual of R slots. Per k/v: `*_hi` [B, S/g, n_hi, K, H*hi_bits/8], `*_lo`
    [B, S/g, g-n_hi, K, H*lo_bits/8], `*_token_scale`/`*_token_zero` [B, S, K] (saliency order
    within each group), `*_channel_scale` [B, S/g, K, H]; `rank` [B, S/g, K, g] (shared by k and
    v); positions [B, S]; lengths [B]: quantized slots in use; residual_k/v [B, R, K, H]."""

    k_hi: UInt8[Array, "B Sg n K Hh"]
    k_lo: UInt8[Array, "B Sg m K Hl"]
    k_token_scale: jax.Array
    k_token_zero: jax.Array
    k_channel_scale: jax.Array
    v_hi: UInt8[Array, "B Sg n K Hh"]
    v_lo: UInt8[Array, "B Sg m K Hl"]
    v_token_scale: jax.Array
    v_token_zero: jax.Array
    v_channel_scale: jax.Array
    rank: UInt8[Array, "B Sg K g"]
    positions: Int[Array, "B S"]
    residual_k: Float[Array, "B R K H"]
    residual_v: Float[Array, "B R K H"]
    residual_positions: Int[Array, "B R"]
    lengths: Int[Array, " B"] | None = None
    sink_k: None = None  # ZipCache keeps salient tokens at more bits, never exact
    sink_v: None = None
    group_size: int = dataclasses.field(default=32, metadata=dict(static=True))
    hi_bits: int = dataclasses.field(default=4, metadata=dict(static=True))
    lo_bits: int = dataclasses.field(default=2, metadata=dict(static=True))

    has_corrections = False

    @property
    def salient(self) -> int:  # n_hi
        return self.k_hi.shape[2]

    def dequantize_block(self, start: Int[Array, ""] | int, size: int) -> tuple[jax.Array, jax.Array]:
        """Keys and values of quantized slots [start, start + size) (whole groups), view dtype."""
        g = self.group_size
        cut = lambda x, first, n: jax.lax.dynamic_slice_in_dim(x, first, n, axis=1)  # noqa: E731
        groups = (start // g, size // g)
        rank = cut(self.rank, *groups)
        bits = dict(hi_bits=self.hi_bits, lo_bits=self.lo_bits)

        def read(p: str) -> jax.Array:
            field = lambda name: getattr(self, f"{p}_{name}")  # noqa: E731
            return dequantize_mixed(cut(field("hi"), *groups), cut(field("lo"), *groups),
                                    cut(field("token_scale"), start, size), cut(field("token_zero"), start, size),
                                    cut(field("channel_scale"), *groups), rank, **bits).astype(self.dtype)

        return read("k"), read("v")

    def validate(self) -> None:
        b, s, kh, h, g = self.batch_size, self.num_quantized, self.num_kv_heads, self.head_dim, self.group_size
        n = self.salient
        if s % g:
            raise ValueError(f"MixedPrecisionView.group_size={g} must divide the {s} quantized slots")
        want = dict(rank=((b, s // g, kh, g), jnp.uint8), positions=((b, s), None))
        for p in "kv":
            want |= {f"{p}_hi": ((b, s // g, n, kh, mixed_code_bytes(h, self.hi_bits)), jnp.uint8),
                     f"{p}_lo": ((b, s // g, g - n, kh, mixed_code_bytes(h, self.lo_bits)), jnp.uint8),
                     f"{p}_token_scale": ((b, s, kh), None), f"{p}_token_zero": ((b, s, kh), None),
                     f"{p}_channel_scale": ((b, s // g, kh, h), None)}
        self.validate_fields(want)
        self.validate_residual()
