"""Decode attention: T <= 16 new queries over a KV cache with per-row lengths.

Flash-Decoding split-K with Lean Attention's stream-K balancing (Sanovar et al.
2024); `decode_attention(q[B,T,N,H], k[B,S,K,H], v[B,S,K,H], *, lengths[B],
q_positions, kv_positions, mask[B,T,S], causal, window, softcap, scale,
return_lse, block_sizes, interpret)`: jitted and validated.
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

_STATIC = ("causal", "window", "softcap", "scale", "return_lse", "block_sizes", "interpret")


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
    interpret: object = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Split-K decode attention on TPU (or interpreted); see `tpu.decode_attention`."""
    b, t = q.shape[:2]
    s = k.shape[1]
    validate(
        q, k, v, window=window, softcap=softcap, scale=scale,
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
        block_sizes=block_sizes, interpret=interpret,
    )


__all__ = ["MAX_QUERIES", "BlockSizes", "decode_attention", "decode_attention_reference"]
