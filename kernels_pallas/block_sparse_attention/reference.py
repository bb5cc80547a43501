"""Plain-jnp oracle for the block-sparse kernel: the listed blocks, expanded to a token mask
per query head, and exact attention inside it (masking by positions as everywhere)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas.flash_attention.reference import default_positions, masked_attention, visible


def listed_blocks(index: Int[Array, "B N Tb M"], count: Int[Array, "B N Tb"], num_key_blocks: int
                  ) -> Bool[Array, "B N Tb Sb"]:
    """Which key blocks each (row, query head, query block) lists (entries past count ignored)."""
    live = jnp.arange(index.shape[-1])[None, None, None, :] < count[..., None]
    hits = jax.nn.one_hot(index, num_key_blocks, dtype=jnp.int32) * live[..., None]
    return jnp.sum(hits, axis=-2) > 0


def block_sparse_reference(
    q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"],
    index: Int[Array, "B N Tb M"], count: Int[Array, "B N Tb"], *, block_q: int, block_k: int,
    q_positions: Int[Array, "B T"] | None = None, kv_positions: Int[Array, "B S"] | None = None,
    causal: bool = True, window: int | None = None, softcap: float | None = None, scale: float | None = None,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """(out, lse), head by head, float32 math."""
    b, t, n, _ = q.shape
    s = k.shape[1]
    dq, dk = default_positions(b, t, s)
    qp = dq if q_positions is None else q_positions
    kp = dk if kv_positions is None else kv_positions
    vis = visible(qp[:, :, None], kp[:, None, :], None, None, causal=causal, window=window)  # B T S
    blocks = listed_blocks(index, count, s // block_k)  # B N Tb Sb
    token_mask = jnp.repeat(jnp.repeat(blocks, block_q, axis=2), block_k, axis=3)  # B N T S
    return masked_attention_per_head(q, k, v, vis[:, None] & token_mask, softcap=softcap, scale=scale)


def masked_attention_per_head(
    q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"], mask: Bool[Array, "B N T S"],
    *, softcap: float | None = None, scale: float | None = None,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """(out, lse) of exact attention with a mask per query head, head by head, float32 math
    (query head n reads KV head n // G)."""
    n, kh = q.shape[2], k.shape[2]
    outs, lses = [], []
    for head in range(n):
        kv = head // (n // kh)
        out, lse = masked_attention(q[:, :, head:head + 1], k[:, :, kv:kv + 1], v[:, :, kv:kv + 1],
                                    mask[:, head], softcap=softcap, scale=scale)
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)
