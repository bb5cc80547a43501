"""Plain-jnp oracle for the flash attention kernel (same signature, float32 math).

Masking is by positions (negative = padding), as in `efficient.attention.spec`:
key s is visible to query t iff both positions are >= 0, (causal) kv <= q,
(window W) q - kv < W, and segment ids are equal (packed prompts, Prepacking,
Zhao et al. 2024). A fully masked row gives zeros and log-sum-exp -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def default_positions(
    batch: int, q_len: int, kv_len: int
) -> tuple[Int[Array, "B T"], Int[Array, "B S"]]:
    """The T queries are the last T of the S keys."""
    q_pos = jnp.arange(kv_len - q_len, kv_len, dtype=jnp.int32)
    kv_pos = jnp.arange(kv_len, dtype=jnp.int32)
    return jnp.broadcast_to(q_pos, (batch, q_len)), jnp.broadcast_to(kv_pos, (batch, kv_len))


def visible(
    q_pos: jax.Array,
    kv_pos: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    *,
    causal: bool,
    window: int | None,
) -> jax.Array:
    """Elementwise visibility of broadcastable query/key positions (shared with the kernels)."""
    vis = (q_pos >= 0) & (kv_pos >= 0)
    if causal:
        vis &= kv_pos <= q_pos
    if window is not None:
        vis &= q_pos - kv_pos < window
    if q_seg is not None:
        vis &= q_seg == kv_seg
    return vis


def soft_cap(logits: jax.Array, softcap: float | None) -> jax.Array:
    """Gemma-2 logit soft-capping: c * tanh(x / c)."""
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)


def masked_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    vis: Bool[Array, "B T S"],
    *,
    softcap: float | None,
    scale: float | None,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Exact softmax attention restricted to `vis`, GQA by reshaping (no K/V repeat)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    scale = h**-0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum(
        "btkgh,bskh->bkgts", qg, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    logits = soft_cap(logits * scale, softcap)
    vis = vis[:, None, None]  # B 1 1 T S
    logits = jnp.where(vis, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(vis, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum(
        "bkgts,bskh->btkgh", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    out = out / jnp.where(denom == 0, 1.0, denom).transpose(0, 3, 1, 2, 4)
    lse = jnp.where(denom[..., 0] > 0, row_max[..., 0] + jnp.log(denom[..., 0]), -jnp.inf)
    return out.reshape(b, t, n, h).astype(q.dtype), lse.transpose(0, 3, 1, 2).reshape(b, t, n)


def flash_attention_reference(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    q_positions: Int[Array, "B T"] | None = None,
    kv_positions: Int[Array, "B S"] | None = None,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> Float[Array, "B T N H"] | tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Exact attention; output in q.dtype, log-sum-exp float32 [B, T, N] if asked."""
    b, t = q.shape[:2]
    dq, dk = default_positions(b, t, k.shape[1])
    q_positions = dq if q_positions is None else q_positions
    kv_positions = dk if kv_positions is None else kv_positions
    vis = visible(
        q_positions[:, :, None],
        kv_positions[:, None, :],
        None if q_segment_ids is None else q_segment_ids[:, :, None],
        None if kv_segment_ids is None else kv_segment_ids[:, None, :],
        causal=causal,
        window=window,
    )
    out, lse = masked_attention(q, k, v, vis, softcap=softcap, scale=scale)
    return (out, lse) if return_lse else out
