"""Decode attention over a KIVI-quantized KV cache (Liu et al. 2024), dequantized in the kernel.

`quantized_decode_attention(q[B,T,N,H], k_codes, k_scale, k_zero, v_codes, v_scale,
v_zero, lengths[B], *, bits, group_size, q_positions, kv_positions, mask[B,T,S],
causal, window, softcap, scale, block_kv, interpret) -> (out[B,T,N,H], lse[B,T,N])`:
jitted and validated. Codes are uint8 [B, S, K, H*bits/8] (packed along H, low bits
first, as `efficient.attention.views.pack_codes`); keys: scale/zero [B, S/g, K, H]
(per channel, groups of g slots); values: scale/zero [B, S, K, H/g] (per token,
groups of g channels). With kv_layout="BKSH" all six arrays are head-major
([B, K, S, H*bits/8], [B, K, S/g, H], [B, K, S, H/g]): what a TPU needs to read one
kv head's block in place when K > 1 (Mosaic tiles the last two axes). The
log-sum-exp lets the caller merge this with the attention over KIVI's
full-precision residual window; an empty row gives out 0 and lse -inf.
Shape letters: Hp = H*bits/8 bytes, Sg = S/g key groups, Hg = H/g value groups.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, UInt8

from kernels_pallas.quantized_attention import tpu
from kernels_pallas.quantized_attention.reference import (
    BITS,
    dequantize_keys,
    dequantize_values,
    quantized_decode_attention_reference,
    unpack_codes,
)

MAX_QUERIES = 16
KV_LAYOUTS = ("BSKH", "BKSH")
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

_STATIC = ("bits", "group_size", "causal", "window", "softcap", "scale", "block_kv", "kv_layout", "interpret")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_array(name: str, x: jax.Array, shape: tuple[int, ...], kind: str, what: str) -> None:
    """Shape first (ValueError), then dtype kind (TypeError): "uint8", "float", "int" or "bool"."""
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {what}={shape}, got {tuple(x.shape)}")
    ok = {
        "uint8": x.dtype == jnp.uint8,
        "float": x.dtype in FLOAT_DTYPES,
        "int": jnp.issubdtype(x.dtype, jnp.integer),
        "bool": x.dtype == jnp.bool_,
    }[kind]
    if not ok:
        allowed = "float32 or bfloat16" if kind == "float" else kind
        raise TypeError(f"{name} must be {allowed}, got {x.dtype}")


def validate(
    q: jax.Array, k_codes: jax.Array, k_scale: jax.Array, k_zero: jax.Array, v_codes: jax.Array,
    v_scale: jax.Array, v_zero: jax.Array, lengths: jax.Array, *, bits: int, group_size: int,
    q_positions: jax.Array | None, kv_positions: jax.Array | None, mask: jax.Array | None,
    window: int | None, softcap: float | None, scale: float | None, block_kv: int | None,
    kv_layout: str = "BSKH",
) -> None:
    """Every input check, before tracing the kernel; errors name the argument and value."""
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    g = _positive_int("group_size", group_size)
    if g % (8 // bits):  # the kernel's code planes keep each group of channels whole
        raise ValueError(f"group_size={g} must be a multiple of 8 // bits = {8 // bits} (codes per byte)")
    if q.ndim != 4:
        raise ValueError(f"q must have rank 4 [B, T, N, H], got shape {tuple(q.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float32 or bfloat16, got {q.dtype}")
    b, t, n, h = q.shape
    if not 1 <= t <= MAX_QUERIES:
        raise ValueError(f"q serves 1 <= T <= {MAX_QUERIES} queries, got T={t} (q shape {tuple(q.shape)})")
    if h % g:
        raise ValueError(f"group_size={g} must divide the head dim H={h} (value groups of channels)")
    head_major = kv_layout == "BKSH"
    ax = lambda s_, k_, last: (b, k_, s_, last) if head_major else (b, s_, k_, last)  # noqa: E731
    what = lambda s_, last: f"[B, K, {s_}, {last}]" if head_major else f"[B, {s_}, K, {last}]"  # noqa: E731
    if k_codes.ndim != 4:
        raise ValueError(f"k_codes must have rank 4 {what('S', 'H*bits/8')}, got shape {tuple(k_codes.shape)}")
    s, kh = k_codes.shape[kv_layout.index("S")], k_codes.shape[kv_layout.index("K")]
    if s == 0 or s % g:
        raise ValueError(f"group_size={g} must divide the slot count S={s} of k_codes (key groups of tokens)")
    if kh == 0 or n % kh:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kh} (k_codes shape {k_codes.shape})")
    for name, x in (("k_codes", k_codes), ("v_codes", v_codes)):
        _check_array(name, x, ax(s, kh, h * bits // 8), "uint8", what("S", "H*bits/8"))
    for name, x in (("k_scale", k_scale), ("k_zero", k_zero)):
        _check_array(name, x, ax(s // g, kh, h), "float", what("S/g", "H"))
    for name, x in (("v_scale", v_scale), ("v_zero", v_zero)):
        _check_array(name, x, ax(s, kh, h // g), "float", what("S", "H/g"))
    _check_array("lengths", lengths, (b,), "int", "[B]")
    if q_positions is not None:
        _check_array("q_positions", q_positions, (b, t), "int", "[B, T]")
    if kv_positions is not None:
        _check_array("kv_positions", kv_positions, (b, s), "int", "[B, S]")
    if mask is not None:
        _check_array("mask", mask, (b, t, s), "bool", "[B, T, S]")
    if window is not None:
        _positive_int("window", window)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be > 0 or None, got {scale!r}")
    if block_kv is not None and _positive_int("block_kv", block_kv) % g:
        raise ValueError(f"block_kv={block_kv} must be a multiple of group_size={g}")


@functools.partial(jax.jit, static_argnames=_STATIC)
def quantized_decode_attention(
    q: Float[Array, "B T N H"],
    k_codes: UInt8[Array, "B S K Hp"],
    k_scale: Float[Array, "B Sg K H"],
    k_zero: Float[Array, "B Sg K H"],
    v_codes: UInt8[Array, "B S K Hp"],
    v_scale: Float[Array, "B S K Hg"],
    v_zero: Float[Array, "B S K Hg"],
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
    """T <= 16 new queries over the S quantized slots of a KIVI cache, dequantized
    block by block in VMEM (`tpu.py`); returns (out in q.dtype, lse float32).

    lengths: slots >= lengths[b] are empty (never fetched past the last needed
    block; NaN there is harmless). q_positions default lengths - T + t and
    kv_positions default s (a KIVI caller usually passes q_positions after its
    residual window). block_kv: key slots per grid step (a multiple of group_size;
    default min(512, S)). kv_layout: "BSKH" (as above) or "BKSH" (head-major, what a TPU
    needs when K > 1). interpret: as `pl.pallas_call` (e.g. `pltpu.InterpretParams()`).
    """
    validate(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, bits=bits, group_size=group_size,
        q_positions=q_positions, kv_positions=kv_positions, mask=mask, window=window, softcap=softcap,
        scale=scale, block_kv=block_kv, kv_layout=kv_layout,
    )
    kv_heads = k_codes.shape[kv_layout.index("K")]
    if kv_layout == "BSKH" and kv_heads > 1 and not interpret:
        raise NotImplementedError(
            f"kv_layout='BSKH' with K={kv_heads} kv heads does not tile on TPU (a kv head's block "
            "would be squeezed in the second-to-last axis): store the cache head-major and pass "
            "kv_layout='BKSH', or run interpreted"
        )
    return tpu.quantized_decode_attention(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, bits=bits, group_size=group_size,
        q_positions=q_positions, kv_positions=kv_positions, mask=mask, causal=causal, window=window,
        softcap=softcap, scale=scale, block_kv=block_kv, kv_layout=kv_layout, interpret=interpret,
    )


__all__ = [
    "BITS",
    "KV_LAYOUTS",
    "MAX_QUERIES",
    "dequantize_keys",
    "dequantize_values",
    "quantized_decode_attention",
    "quantized_decode_attention_reference",
    "unpack_codes",
    "validate",
]
