"""The online softmax every attention kernel here keeps in VMEM scratch (FlashAttention-2,
Dao 2023; Milakov & Gimelshein 2018): running max m [R, 1], running sum l [R, 1] and a
float32 accumulator, reset at a tile's first key block, advanced per key block, and
normalised into the output and log-sum-exp at its last (a row that saw nothing: zeros, -inf)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reset(m_ref, l_ref, acc_ref) -> None:  # noqa: ANN001
    m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)


def advance(m_ref, l_ref, logits: jax.Array) -> tuple[jax.Array, jax.Array]:  # noqa: ANN001
    """Fold one key block's masked logits [R, bk] (-inf where hidden) into m and l; returns its
    probabilities exp(logits - m_new) and the factor alpha [R, 1] the accumulator is rescaled by."""
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(logits - m_safe)  # hidden entries: exp(-inf) = 0
    alpha = jnp.exp(m_prev - m_safe)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_new
    return p, alpha


def emit(m_ref, l_ref, acc: jax.Array, o_ref, lse_ref, expand=lambda l: l) -> None:  # noqa: ANN001
    """o = acc / l and lse = m + log l; `expand` shapes l like acc (e.g. a leading plane axis)."""
    l = l_ref[...]
    empty = l == 0.0
    o_ref[...] = (acc / expand(jnp.where(empty, 1.0, l))).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(jnp.where(empty, 1.0, l)))
