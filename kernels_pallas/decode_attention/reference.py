"""Plain-jnp oracle for decode attention (same signature as the kernel).

A cache row b holds `lengths[b]` valid slots; the T new queries are the last T
of them unless positions say otherwise. `mask[b, t, s]` (e.g. a tree mask over
the new tokens for speculative verification) further restricts visibility.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas.flash_attention.reference import masked_attention, visible


def decode_positions(
    lengths: Int[Array, "B"], q_len: int, kv_len: int
) -> tuple[Int[Array, "B T"], Int[Array, "B S"]]:
    """Default positions: slot s holds position s; queries at lengths - T + t."""
    q_pos = lengths[:, None] - q_len + jnp.arange(q_len, dtype=jnp.int32)[None]
    kv_pos = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (lengths.shape[0], kv_len))
    return q_pos.astype(jnp.int32), kv_pos


def decode_attention_reference(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    lengths: Int[Array, "B"] | None = None,
    q_positions: Int[Array, "B T"] | None = None,
    kv_positions: Int[Array, "B S"] | None = None,
    mask: Bool[Array, "B T S"] | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> Float[Array, "B T N H"] | tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Exact attention of T new queries over a cache with per-row lengths."""
    b, t = q.shape[:2]
    s = k.shape[1]
    lengths = jnp.full((b,), s, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    dq, dk = decode_positions(lengths, t, s)
    q_positions = dq if q_positions is None else q_positions
    kv_positions = dk if kv_positions is None else kv_positions
    in_cache = jnp.arange(s)[None, :] < lengths[:, None]  # B S
    kv_positions = jnp.where(in_cache, kv_positions, -1)
    vis = visible(
        q_positions[:, :, None], kv_positions[:, None, :], None, None, causal=causal, window=window
    )
    if mask is not None:
        vis &= mask
    out, lse = masked_attention(q, k, v, vis, softcap=softcap, scale=scale)
    return (out, lse) if return_lse else out
