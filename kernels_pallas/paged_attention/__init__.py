"""Paged decode attention: T <= 16 new queries over a paged KV cache, read in place.

PagedAttention (Kwon et al. 2023): `paged_decode_attention(q[B,T,N,H],
k_pages[M,P,K,H], v_pages[M,P,K,H], page_table[B,R], lengths[B], *, q_positions,
page_positions[M,P], mask[B,T,R*P], causal, window, softcap, scale, return_lse,
pages_per_block, interpret)`: jitted and validated. Logical slot s of row b is
slot s % P of page page_table[b, s // P]; slots >= lengths[b] are empty (their
contents undefined, possibly NaN); page_positions None: slot s holds position s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas.decode_attention import MAX_QUERIES
from kernels_pallas.flash_attention import validate
from kernels_pallas.paged_attention import tpu
from kernels_pallas.paged_attention.reference import paged_decode_attention_reference

_STATIC = ("causal", "window", "softcap", "scale", "return_lse", "pages_per_block", "interpret")


def _check(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array, lengths: jax.Array,
    q_positions: jax.Array | None, page_positions: jax.Array | None, mask: jax.Array | None,
    window: int | None, softcap: float | None, scale: float | None, pages_per_block: int | None,
) -> None:
    """Shape/dtype checks before tracing the kernel; errors name the argument and value."""
    if q.ndim != 4:
        raise ValueError(f"q must have rank 4 [B, T, N, H], got shape {tuple(q.shape)}")
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [M, P, K, H], got shape {tuple(x.shape)}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {tuple(k_pages.shape)} and v_pages {tuple(v_pages.shape)} must be equal")
    b, t = q.shape[:2]
    m, p, kh, h = k_pages.shape
    if page_table.ndim != 2 or page_table.shape[0] != b:
        raise ValueError(f"page_table must have shape [B={b}, R], got {tuple(page_table.shape)}")
    if not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise TypeError(f"page_table must be an integer dtype (int32), got {page_table.dtype}")
    s = page_table.shape[1] * p
    logical = jax.ShapeDtypeStruct((b, s, kh, h), k_pages.dtype)  # the [B, S, K, H] cache it stands for
    validate(
        q, logical, logical, window=window, softcap=softcap, scale=scale,
        block_sizes=None, block_sizes_type=type(None),
        ids={
            "lengths": (lengths, (b,)),
            "q_positions": (q_positions, (b, t)),
            "page_positions": (page_positions, (m, p)),
        },
    )
    if t > MAX_QUERIES:
        raise NotImplementedError(f"paged decode serves T <= {MAX_QUERIES} queries, got T={t} (q)")
    if mask is not None:
        if tuple(mask.shape) != (b, t, s):
            raise ValueError(f"mask must have shape [B, T, R*P] = {(b, t, s)}, got {tuple(mask.shape)}")
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be bool, got {mask.dtype}")
    if pages_per_block is not None and (
        isinstance(pages_per_block, bool) or not isinstance(pages_per_block, int) or pages_per_block < 1
    ):
        raise ValueError(f"pages_per_block must be a positive int or None, got {pages_per_block!r}")


@functools.partial(jax.jit, static_argnames=_STATIC)
def paged_decode_attention(
    q: Float[Array, "B T N H"],
    k_pages: Float[Array, "M P K H"],
    v_pages: Float[Array, "M P K H"],
    page_table: Int[Array, "B R"],
    lengths: Int[Array, " B"],
    *,
    q_positions: Int[Array, "B T"] | None = None,
    page_positions: Int[Array, "M P"] | None = None,
    mask: Bool[Array, "B T S"] | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    pages_per_block: int | None = None,
    interpret: object = False,
) -> Float[Array, "B T N H"] | tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Paged decode attention on TPU (or interpreted); see `tpu.paged_decode_attention`.

    Returns out [B, T, N, H] in q.dtype, and with return_lse the float32 log-sum-exp
    [B, T, N] (-inf for a fully masked query, whose output is 0)."""
    _check(q, k_pages, v_pages, page_table, lengths, q_positions, page_positions, mask,
           window, softcap, scale, pages_per_block)
    return tpu.paged_decode_attention(
        q, k_pages, v_pages, page_table, lengths,
        q_positions=q_positions, page_positions=page_positions, mask=mask,
        causal=causal, window=window, softcap=softcap, scale=scale, return_lse=return_lse,
        pages_per_block=pages_per_block, interpret=interpret,
    )


__all__ = ["MAX_QUERIES", "paged_decode_attention", "paged_decode_attention_reference"]
