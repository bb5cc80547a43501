"""Plain-jnp oracle for paged decode attention (same signature as the kernel).

The pool holds M pages of P slots; logical slot s of row b is slot s % P of page
page_table[b, s // P] (PagedAttention, Kwon et al. 2023). The oracle gathers the
pages into a logical [B, R*P, K, H] cache (a dense copy: fine for an oracle, never
for a kernel), zeroes the empty slots (their contents are undefined, NaN
included) and calls the dense decode oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas.decode_attention.reference import decode_attention_reference


def gather_pages(
    k_pages: Float[Array, "M P K H"],
    v_pages: Float[Array, "M P K H"],
    page_table: Int[Array, "B R"],
    lengths: Int[Array, " B"],
    page_positions: Int[Array, "M P"] | None = None,
) -> tuple[Float[Array, "B S K H"], Float[Array, "B S K H"], Int[Array, "B S"] | None]:
    """Logical k, v [B, S=R*P, K, H] (slots >= lengths zeroed) and positions [B, S] (or None)."""
    m, p, kh, h = k_pages.shape
    b, r = page_table.shape
    pages = jnp.clip(page_table.astype(jnp.int32), 0, m - 1)
    in_cache = (jnp.arange(r * p)[None, :] < lengths[:, None])[:, :, None, None]  # B S 1 1
    k, v = (jnp.where(in_cache, x[pages].reshape(b, r * p, kh, h), 0).astype(x.dtype) for x in (k_pages, v_pages))
    kv_positions = None if page_positions is None else page_positions[pages].reshape(b, r * p).astype(jnp.int32)
    return k, v, kv_positions


def paged_decode_attention_reference(
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
) -> Float[Array, "B T N H"] | tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Exact attention of T new queries over a paged cache; page_positions None: slot s
    holds position s; q_positions None: lengths[b] - T + t."""
    s = page_table.shape[1] * k_pages.shape[1]
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s)
    k, v, kv_positions = gather_pages(k_pages, v_pages, page_table, lengths, page_positions)
    result: jax.Array | tuple[jax.Array, jax.Array] = decode_attention_reference(
        q, k, v, lengths=lengths, q_positions=q_positions, kv_positions=kv_positions, mask=mask,
        causal=causal, window=window, softcap=softcap, scale=scale, return_lse=return_lse,
    )
    return result
