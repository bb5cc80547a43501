"""Decode attention: T <= 16 new queries over a KV cache with per-row lengths.

Flash-Decoding split-K with Lean Attention's stream-K balancing (Sanovar et al.
2024); `decode_attention(q[B,T,N,H], k[B,S,K,H], v[B,S,K,H], *, lengths[B],
q_positions, kv_positions, mask[B,T,S], causal, window, softcap, scale,
return_lse, block_sizes, kv_layout, interpret)`: jitted and validated. With
kv_layout="BKSH", k and v are [B, K, S, H] (the dense cache's layout) and are
read in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.decode_attention import tpu
from kernels_pallas.decode_attention.reference import decode_attention_reference
from kernels_pallas.decode_attention.tuning import BlockSizes
from kernels_pallas.flash_attention import validate

MAX_QUERIES = 16

_STATIC = ("causal", "window", "softcap", "scale", "return_lse", "block_sizes", "kv_layout", "interpret")
KV_LAYOUTS = ("BSKH", "BKSH")


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    lengths: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    mask: jax.Array | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    block_sizes: BlockSizes | None = None,
    kv_layout: str = "BSKH",
    interpret: object = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Split-K decode attention on TPU (or interpreted); see `tpu.decode_attention`.

    kv_layout: "BSKH" (k, v [B, S, K, H]) or "BKSH" (k, v [B, K, S, H], read in place)."""
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    b, t = q.shape[:2]
    k_, v_ = k, v  # checks run on the logical [B, S, K, H] shapes
    if kv_layout == "BKSH" and k.ndim == v.ndim == 4:
        k_, v_ = (jax.ShapeDtypeStruct((x.shape[0], x.shape[2], x.shape[1], x.shape[3]), x.dtype) for x in (k, v))
    s = k_.shape[1]
    validate(
        q, k_, v_, window=window, softcap=softcap, scale=scale,
        block_sizes=block_sizes, block_sizes_type=BlockSizes,
        ids={
            "lengths": (lengths, (b,)),
            "q_positions": (q_positions, (b, t)),
            "kv_positions": (kv_positions, (b, s)),
        },
    )
    if t > MAX_QUERIES:
        raise NotImplementedError(f"decode serves T <= {MAX_QUERIES} queries, got T={t}")
    if mask is not None:
        if tuple(mask.shape) != (b, t, s):
            raise ValueError(f"mask must have shape {(b, t, s)}, got {tuple(mask.shape)}")
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be bool, got {mask.dtype}")
    return tpu.decode_attention(
        q, k, v,
        lengths=lengths, q_positions=q_positions, kv_positions=kv_positions, mask=mask,
        causal=causal, window=window, softcap=softcap, scale=scale, return_lse=return_lse,
        block_sizes=block_sizes, kv_layout=kv_layout, interpret=interpret,
    )


__all__ = ["KV_LAYOUTS", "MAX_QUERIES", "BlockSizes", "decode_attention", "decode_attention_reference"]
