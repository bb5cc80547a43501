"""Attention over a paged or quantized view, one key block at a time (the "xla" path).

A paged view is read a block of pages at a time through its page table, a
quantized view is dequantized a block of slots at a time (KIVI's codes, scales
and zeros of that block only), and its full-precision residual is one more
block: the cache is never copied whole into a dense float array. Each block's
normalised output and log-sum-exp are merged with the running ones (the online
softmax's associativity, Milakov & Gimelshein 2018), and the loop stops after
the last block below the longest row's length. Temporary memory is one block,
O(B * block * K * H), whatever the capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from efficient.attention.reference import grouped_attention, grouped_logits, grouped_visibility, key_mass, pack_outputs
from efficient.attention.spec import AttentionSpec, KeyStats
from efficient.attention.views import QUANTIZED_VIEWS, LowBitView, PagedView, QuantizedView

TARGET_BLOCK = 512  # slots per block: measured on XLA:CPU like the blockwise dense path's decode blocks


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)


def block_slots(view: PagedView | QuantizedView | LowBitView) -> int:
    """Slots per block: whole pages (paged) or whole key groups (quantized), dividing the store."""
    if isinstance(view, PagedView):
        pages = view.page_table.shape[1]
        return view.page_size * _largest_divisor_at_most(pages, TARGET_BLOCK // view.page_size)
    g = view.group_size
    return g * _largest_divisor_at_most(view.num_quantized // g, TARGET_BLOCK // g)


def _store_slots(view: PagedView | QuantizedView | LowBitView) -> int:
    return view.num_slots if isinstance(view, PagedView) else view.num_quantized


def view_block(
    view: PagedView | QuantizedView | LowBitView, start: Int[Array, ""], size: int
) -> tuple[Float[Array, "B C K H"], Float[Array, "B C K H"], Int[Array, "B C"]]:
    """Keys, values and positions (-1 past a row's length) of logical slots [start, start + size)."""
    b = view.batch_size
    if isinstance(view, PagedView):
        p = view.page_size
        pages = jax.lax.dynamic_slice_in_dim(view.page_table, start // p, size // p, axis=1)
        pages = jnp.clip(pages, 0, view.k_pages.shape[0] - 1)
        k = view.k_pages[pages].reshape(b, size, view.num_kv_heads, view.head_dim)
        v = view.v_pages[pages].reshape(b, size, view.num_kv_heads, view.head_dim)
        pos = view.positions[pages].reshape(b, size)
    else:  # QuantizedView, LowBitView: codes (and corrections, sinks) of this block only
        k, v = view.dequantize_block(start, size)
        pos = jax.lax.dynamic_slice_in_dim(view.positions, start, size, axis=1)
    slot = start + jnp.arange(size, dtype=jnp.int32)[None, :]
    if view.lengths is not None:
        pos = jnp.where(slot < view.lengths[:, None], pos, -1)
    return k, v, pos.astype(jnp.int32)


def merge_partials(acc: tuple[jax.Array, jax.Array], part: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Combine two normalised partial attentions by their log-sum-exps (-inf: empty)."""
    (o1, l1), (o2, l2) = acc, part
    lse = jnp.logaddexp(l1, l2)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w1 = jnp.where(jnp.isfinite(l1), jnp.exp(l1 - safe), 0.0)[..., None]
    w2 = jnp.where(jnp.isfinite(l2), jnp.exp(l2 - safe), 0.0)[..., None]
    return o1 * w1 + o2.astype(jnp.float32) * w2, lse


def attend_slots(
    q: Float[Array, "B T N H"], k: Float[Array, "B C K H"], v: Float[Array, "B C K H"], positions: Int[Array, "B C"],
    *, spec: AttentionSpec, q_positions: Int[Array, "B T"], q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B C"] | None = None, mask: Bool[Array, "B T C"] | None = None, exact: bool = False,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """(normalised out, lse) over C slots of a block; empty slots (position -1) have their
    values zeroed, so whatever they hold (NaN included) cannot reach the output."""
    v = jnp.where((positions >= 0)[:, :, None, None], v, jnp.zeros((), v.dtype))
    return grouped_attention(q, k, v, spec=spec, q_positions=q_positions, kv_positions=positions,
                             q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, mask=mask,
                             return_lse=True, exact=exact)


def attention_over_blocks(
    q: Float[Array, "B T N H"],
    view: PagedView | QuantizedView | LowBitView,
    *,
    spec: AttentionSpec,
    q_positions: Int[Array, "B T"],
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    mask: Bool[Array, "B T S"] | None = None,
    return_lse: bool = False,
    exact: bool = False,
    key_stats: KeyStats | None = None,
):  # noqa: ANN201  out, (out, lse), (out, mass) or (out, lse, mass)
    """Attention of q over `view`, key block by key block (see the module docstring).
    key_stats: only the mass of a quantized view's residual (`tail` = its R entries),
    from the residual's logits and the final log-sum-exp."""
    b, t, n, h = q.shape
    size = block_slots(view)
    stored = _store_slots(view)
    lengths = view.lengths if view.lengths is not None else jnp.full((b,), stored, jnp.int32)
    num_blocks = -(-jnp.max(lengths) // size)

    if key_stats is not None and (not isinstance(view, QUANTIZED_VIEWS) or key_stats.tail != view.residual_k.shape[1]):
        raise ValueError(f"attention_over_blocks: key_stats serves a quantized view's residual only (tail=R), got "
                         f"{key_stats} for a {type(view).__name__}")
    cut = lambda x, axis, first, width: (  # noqa: E731
        None if x is None else jax.lax.dynamic_slice_in_dim(x, first, width, axis=axis))

    def attend(k: jax.Array, v: jax.Array, pos: jax.Array, first: jax.Array | int, width: int):  # noqa: ANN202
        return attend_slots(q, k, v, pos, spec=spec, q_positions=q_positions, q_segment_ids=q_segment_ids,
                            kv_segment_ids=cut(kv_segment_ids, 1, first, width), mask=cut(mask, 2, first, width),
                            exact=exact)

    def body(i: jax.Array, acc: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        start = i * size
        k, v, pos = view_block(view, start, size)
        return merge_partials(acc, attend(k, v, pos, start, size))

    acc = (jnp.zeros((b, t, n, h), jnp.float32), jnp.full((b, t, n), -jnp.inf, jnp.float32))
    acc = jax.lax.fori_loop(0, num_blocks, body, acc)
    if isinstance(view, QUANTIZED_VIEWS):
        residual = attend(view.residual_k, view.residual_v, view.residual_positions.astype(jnp.int32), stored,
                          view.residual_k.shape[1])
        acc = merge_partials(acc, residual)
    out, lse = acc
    mass = None
    if key_stats is not None:
        r = view.residual_k.shape[1]
        mass = residual_mass(q, view.residual_k, view.residual_positions.astype(jnp.int32), lse, key_stats,
                             spec=spec, q_positions=q_positions, q_segment_ids=q_segment_ids,
                             kv_segment_ids=cut(kv_segment_ids, 1, stored, r), mask=cut(mask, 2, stored, r),
                             exact=exact)
    return pack_outputs(out.astype(q.dtype), lse, mass, return_lse)


def residual_mass(
    q: Float[Array, "B T N H"], k: Float[Array, "B R K H"], positions: Int[Array, "B R"], lse: Float[Array, "B T N"],
    request: KeyStats, *, spec: AttentionSpec, q_positions: Int[Array, "B T"],
    q_segment_ids: Int[Array, "B T"] | None, kv_segment_ids: Int[Array, "B R"] | None,
    mask: Bool[Array, "B T R"] | None, exact: bool,
) -> jax.Array:
    """The attention mass of R slots under the softmax over the whole view (its log-sum-exp
    `lse`): exp(logit - lse) where visible, summed as `request` asks ([B, (K,) (T,) R])."""
    b, t, n, _ = q.shape
    kh = k.shape[2]
    logits = grouped_logits(q, k, spec=spec, exact=exact)  # B K G T R
    visible = grouped_visibility(spec, q_positions, positions, q_segment_ids, kv_segment_ids, mask)
    norm = jnp.transpose(lse.reshape(b, t, kh, n // kh), (0, 2, 3, 1))[..., None]  # B K G T 1
    probs = jnp.where(visible & jnp.isfinite(norm), jnp.exp(logits - jnp.where(jnp.isfinite(norm), norm, 0.0)), 0.0)
    return key_mass(probs, request)
