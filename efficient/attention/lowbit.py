"""1.x-bit keys and 1.58-bit values (VidKV, Tao et al. 2025, "Plug-and-Play 1.x-Bit KV Cache
Quantization for Video Large Language Models"), applied to text, and the view attention reads.

Both keys and values are quantized per channel over groups of g consecutive tokens (VidKV
quantizes values per channel too, unlike KIVI's per-token values).

Keys: in each (group, KV head) the A channels with the widest range over the group's
tokens ("anomalous") get 2-bit min-max codes; the other N = H - A channels are moved to
the frequency domain by an orthonormal real DFT along the channels (VidKV's FFT; orthonormal,
so the error energy is the same in both domains) and each coefficient gets 1-bit codes:
sign(y) * s with s = mean |y| over the group's tokens, the least-squares scale for those
signs. A per-group channel mask (H bits) says which channels are anomalous. With A = H / 2
the codes take 1.5 bits per key entry.

Values: ternary codes in {-1, 0, +1} * s (1.58 bits of information): a channel's entries
with |x| > 0.5 * mean |x| (BitNet b1.58's absmean rounding) are kept as their sign, the rest
as 0, and s is the mean |x| over the kept entries (the least-squares scale for those codes;
absmean over all entries would be smaller). Five trits are packed per byte (3^5 = 243 <= 256),
so the codes take 1.6 bits per value entry.

Not built from VidKV: the protection of semantically salient visual tokens (there are no
visual tokens in text); the full-precision residual of the most recent tokens plays the
part of a protected set.

Scales (and the anomalous channels' zeros) are per (group, KV head, channel), in the cache
dtype: at g = 32 and bfloat16 they add 0.75 bits per key and 0.5 per value entry, which
`nbytes` counts.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, UInt8

from efficient.attention.store_view import ResidualStoreView

TRITS_PER_BYTE = 5
TERNARY_THRESHOLD = 0.5  # times mean |x|: BitNet b1.58's round(x / absmean) clipped to [-1, 1]


# ------------------------------------------------------------------ packing


def pack_bits(bits: Bool[Array, "... H"]) -> UInt8[Array, "... H8"]:
    """Pack booleans along the last axis, 8 per byte, low bit first (zero-padded to whole bytes)."""
    h = bits.shape[-1]
    c = jnp.pad(bits.astype(jnp.uint8), [(0, 0)] * (bits.ndim - 1) + [(0, -h % 8)])
    c = c.reshape(*bits.shape[:-1], -1, 8)
    return jnp.sum(c << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)


def unpack_bits(packed: UInt8[Array, "... H8"], h: int) -> UInt8[Array, "... H"]:
    codes = (packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & jnp.uint8(1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :h]


def trit_bytes(h: int) -> int:
    return -(-h // TRITS_PER_BYTE)


def pack_trits(codes: Int[Array, "... H"]) -> UInt8[Array, "... Ht"]:
    """Base-3 packing of codes in {0, 1, 2}: five per byte (sum of c_i * 3^i <= 242)."""
    h = codes.shape[-1]
    pad = trit_bytes(h) * TRITS_PER_BYTE - h
    c = jnp.pad(codes.astype(jnp.int32), [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    c = c.reshape(*codes.shape[:-1], -1, TRITS_PER_BYTE)
    return jnp.sum(c * (3 ** jnp.arange(TRITS_PER_BYTE, dtype=jnp.int32)), axis=-1).astype(jnp.uint8)


def unpack_trits(packed: UInt8[Array, "... Ht"], h: int) -> Int[Array, "... H"]:
    p = packed.astype(jnp.int32)[..., None] // (3 ** jnp.arange(TRITS_PER_BYTE, dtype=jnp.int32))
    return (p % 3).reshape(*packed.shape[:-1], -1)[..., :h]


# ------------------------------------------------------------------ transforms


@functools.cache
def real_dft_basis(n: int) -> np.ndarray:
    """Orthonormal real DFT basis Phi [n, n] (float32): coefficients y = Phi @ x are the DC term,
    then cos/sin pairs of frequencies 1 .. (n-1)//2, then (n even) the Nyquist term; they equal
    numpy's rfft with norm="ortho", the non-DC, non-Nyquist terms scaled by sqrt(2)
    (real part, then minus the imaginary part). x = Phi.T @ y."""
    j = np.arange(n)
    rows = [np.full(n, 1 / np.sqrt(n))]
    for f in range(1, (n - 1) // 2 + 1):
        rows.append(np.sqrt(2 / n) * np.cos(2 * np.pi * f * j / n))
        rows.append(np.sqrt(2 / n) * np.sin(2 * np.pi * f * j / n))
    if n % 2 == 0:
        rows.append((-1.0) ** j / np.sqrt(n))
    return np.stack(rows).astype(np.float32)


def anomalous_order(mask: Bool[Array, "... H"], anomalous: int) -> Int[Array, "... H"]:
    """Where channel c sits in the sorted layout (anomalous channels first, each part in channel
    order): the inverse of the gather that builds it."""
    m = mask.astype(jnp.int32)
    first = jnp.cumsum(m, axis=-1) - 1
    rest = anomalous + jnp.cumsum(1 - m, axis=-1) - 1
    return jnp.where(mask, first, rest)


# ------------------------------------------------------------------ keys


def quantize_keys_lowbit(
    k: Float[Array, "B F g K H"], anomalous: int, fft: bool = True
) -> dict[str, jax.Array]:
    """Per (group, head): codes [B, F*g, K, ceil((H + A) / 8)] (one bit stream per token: the
    low then the high bits of the anomalous channels' 2-bit codes, then the signs of the other
    channels' coefficients), scale [B, F, K, H] (sorted layout: anomalous channels' steps, then
    twice the coefficients' scales), zero [B, F, K, A] (anomalous channels' minima), mask
    [B, F, K, ceil(H/8)] (packed: which channels are anomalous)."""
    b, f, g, kh, h = k.shape
    x = k.astype(jnp.float32)
    spread = jnp.max(x, axis=2) - jnp.min(x, axis=2)  # B F K H
    top = jax.lax.top_k(spread, anomalous)[1] if anomalous else jnp.zeros((b, f, kh, 0), jnp.int32)
    mask = jnp.zeros((b, f, kh, h), bool).at[
        jnp.arange(b)[:, None, None, None], jnp.arange(f)[None, :, None, None],
        jnp.arange(kh)[None, None, :, None], top].set(True)
    order = anomalous_order(mask, anomalous)  # B F K H
    gather = jnp.argsort(order, axis=-1)  # sorted position -> channel
    xs = jnp.take_along_axis(x, gather[:, :, None], axis=-1)  # B F g K H, sorted layout
    xa, xn = xs[..., :anomalous], xs[..., anomalous:]
    lo, hi = jnp.min(xa, axis=2), jnp.max(xa, axis=2)
    step = (hi - lo) / 3
    codes_a = jnp.clip(jnp.round((xa - lo[:, :, None]) / jnp.where(step > 0, step, 1.0)[:, :, None]), 0, 3)
    if fft and h > anomalous:
        xn = xn @ jnp.asarray(real_dft_basis(h - anomalous)).T
    s = jnp.mean(jnp.abs(xn), axis=2)  # B F K N
    codes_a = codes_a.astype(jnp.uint8)
    stream = jnp.concatenate([codes_a & 1, codes_a >> 1, (xn >= 0).astype(jnp.uint8)], axis=-1)
    return dict(k_codes=pack_bits(stream).reshape(b, f * g, kh, -1), k_scale=jnp.concatenate([step, 2 * s], axis=-1),
                k_zero=lo, k_mask=pack_bits(mask))


def dequantize_keys_lowbit(
    codes: UInt8[Array, "B C K Hk"], scale: Float[Array, "B Cg K H"], zero: Float[Array, "B Cg K A"],
    mask: UInt8[Array, "B Cg K H8"], *, group_size: int, anomalous: int, fft: bool,
) -> Float[Array, "B C K H"]:
    """The keys of C slots (whole groups) in channel order, float32."""
    g, a = group_size, anomalous
    h = scale.shape[-1]
    stream = unpack_bits(codes, h + a)
    ca = stream[..., :a] + 2 * stream[..., a:2 * a]
    cn = stream[..., 2 * a:]
    rep = lambda x: jnp.repeat(x, g, axis=1)  # noqa: E731  per group -> per slot
    step, s2 = rep(scale[..., :a]), rep(scale[..., a:])
    xa = ca.astype(jnp.float32) * step + rep(zero)
    xn = cn.astype(jnp.float32) * s2 - s2 / 2  # sign * s
    if fft and h > a:
        xn = xn @ jnp.asarray(real_dft_basis(h - a))
    xs = jnp.concatenate([xa, xn], axis=-1)
    order = anomalous_order(unpack_bits(mask, h).astype(bool), a)
    return jnp.take_along_axis(xs, rep(order), axis=-1)


# ------------------------------------------------------------------ values


def quantize_values_ternary(v: Float[Array, "B F g K H"]) -> dict[str, jax.Array]:
    """Per (group, head, channel): codes in {0, 1, 2} (value -1, 0, +1) packed five per byte
    [B, F*g, K, ceil(H/5)] and scale [B, F, K, H]."""
    b, f, g, kh, h = v.shape
    x = v.astype(jnp.float32)
    mag = jnp.abs(x)
    threshold = TERNARY_THRESHOLD * jnp.mean(mag, axis=2, keepdims=True)
    kept = mag > threshold
    count = jnp.sum(kept, axis=2)
    scale = jnp.sum(jnp.where(kept, mag, 0.0), axis=2) / jnp.maximum(count, 1)
    codes = jnp.where(kept, jnp.where(x > 0, 2, 0), 1)
    return dict(v_codes=pack_trits(codes).reshape(b, f * g, kh, -1), v_scale=scale)


def dequantize_values_ternary(
    codes: UInt8[Array, "B C K Ht"], scale: Float[Array, "B Cg K H"], *, group_size: int
) -> Float[Array, "B C K H"]:
    h = scale.shape[-1]
    trits = unpack_trits(codes, h).astype(jnp.float32) - 1.0
    return trits * jnp.repeat(scale, group_size, axis=1)


# ------------------------------------------------------------------ view


def lowbit_key_bytes(head_dim: int, anomalous: int) -> int:
    """Bytes of one token's key codes: 2 bits per anomalous channel, 1 per other, padded to bytes."""
    return -(-(head_dim + anomalous) // 8)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowBitView(ResidualStoreView):
    """VidKV-style 1.x-bit keys and ternary values (module docstring) over S slots, plus a
    full-precision residual of R slots; logical slot order is the S quantized slots, then the
    residual. k_codes [B, S, K, ceil((H + A)/8)], k_scale [B, S/g, K, H], k_zero [B, S/g, K, A],
    k_mask [B, S/g, K, ceil(H/8)]; v_codes [B, S, K, ceil(H/5)], v_scale [B, S/g, K, H];
    positions [B, S]; lengths [B]: quantized slots in use; residual_k/v [B, R, K, H];
    optional sink_k/v [B, n, K, H]: the exact keys/values of quantized slots 0 .. n-1 (n <= g)."""

    k_codes: UInt8[Array, "B S K Hk"]
    k_scale: jax.Array
    k_zero: jax.Array
    k_mask: UInt8[Array, "B Sg K H8"]
    v_codes: UInt8[Array, "B S K Ht"]
    v_scale: jax.Array
    positions: Int[Array, "B S"]
    residual_k: Float[Array, "B R K H"]
    residual_v: Float[Array, "B R K H"]
    residual_positions: Int[Array, "B R"]
    lengths: Int[Array, " B"] | None = None
    sink_k: Float[Array, "B n K H"] | None = None
    sink_v: Float[Array, "B n K H"] | None = None
    group_size: int = dataclasses.field(default=32, metadata=dict(static=True))
    anomalous: int = dataclasses.field(default=0, metadata=dict(static=True))
    fft: bool = dataclasses.field(default=True, metadata=dict(static=True))

    has_corrections = False

    def dequantize_block(self, start: Int[Array, ""] | int, size: int) -> tuple[jax.Array, jax.Array]:
        """Keys and values of quantized slots [start, start + size) (whole groups), view dtype."""
        g = self.group_size
        cut = lambda x, first, n: jax.lax.dynamic_slice_in_dim(x, first, n, axis=1)  # noqa: E731
        k = dequantize_keys_lowbit(
            cut(self.k_codes, start, size), cut(self.k_scale, start // g, size // g),
            cut(self.k_zero, start // g, size // g), cut(self.k_mask, start // g, size // g),
            group_size=g, anomalous=self.anomalous, fft=self.fft)
        v = dequantize_values_ternary(cut(self.v_codes, start, size), cut(self.v_scale, start // g, size // g),
                                      group_size=g)
        return self.overlay_sinks(k.astype(self.dtype), v.astype(self.dtype), start, size)

    def validate(self) -> None:
        b, s, kh, h, g = self.batch_size, self.num_quantized, self.num_kv_heads, self.head_dim, self.group_size
        a = self.anomalous
        if s % g:
            raise ValueError(f"LowBitView.group_size={g} must divide the {s} quantized slots")
        want = dict(k_codes=((b, s, kh, lowbit_key_bytes(h, a)), jnp.uint8), k_mask=((b, s // g, kh, -(-h // 8)), jnp.uint8),
                    v_codes=((b, s, kh, trit_bytes(h)), jnp.uint8), k_scale=((b, s // g, kh, h), None),
                    k_zero=((b, s // g, kh, a), None), v_scale=((b, s // g, kh, h), None),
                    positions=((b, s), None))
        self.validate_fields(want)
        self.validate_sinks(g)
        self.validate_residual()
