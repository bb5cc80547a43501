"""The "pallas_tpu" attention implementation: Pallas Mosaic TPU kernels.

Routing: T <= 16 queries without segment ids go to the split-K decode kernel
(which also takes an arbitrary `mask`, e.g. a tree mask, and reads a
`DenseView` in place in either layout, skipping the key blocks past each row's
length or before its window); everything else to the flash kernel
(causal/window/soft-cap/segment ids by positions, no `mask`; it reads
[B, S, K, H], so a "BKSH" view is transposed for it: prefill cost, once per
call). What is served is declared in `capabilities.CAPABILITIES["pallas_tpu"]`.
A `PagedView` (T <= 16) goes to "pallas_tpu_paged" (pages read through the
scalar-prefetched page table) and a `QuantizedView` (T <= 16) to
"pallas_tpu_quantized" (KIVI codes dequantized in the kernel, the residual by XLA,
merged by log-sum-exp); longer calls on those views fall back to "xla", which reads
them block by block. On CPU the kernels run in TPU interpret mode (slow; for tests
and debugging).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from efficient.attention.dispatcher import register_implementation
from efficient.attention.spec import AttentionSpec, KeyStats
from efficient.attention.reference import pack_outputs
from efficient.attention.view_blocks import attend_slots, merge_partials
from efficient.attention.views import DenseView, PagedView, QuantizedView, slot_positions
from kernels_pallas.decode_attention import MAX_QUERIES, decode_attention
from kernels_pallas.flash_attention import flash_attention
from kernels_pallas.paged_attention import paged_decode_attention
from kernels_pallas.quantized_attention import quantized_decode_attention


def _interpret() -> object:
    if jax.default_backend() == "tpu":
        return False
    return pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")


def pallas_tpu_attention(
    q: jax.Array,
    view: DenseView,
    *,
    spec: AttentionSpec,
    q_positions: jax.Array | None,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    mask: jax.Array | None,
    return_lse: bool,
    key_stats: KeyStats | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Dispatcher adapter (the capability table has already admitted the case)."""
    del key_stats  # not served (declared in the table)
    common = dict(
        causal=spec.causal,
        window=spec.window,
        softcap=spec.softcap,
        scale=spec.scale,
        return_lse=return_lse,
        interpret=_interpret(),
    )
    if q.shape[1] <= MAX_QUERIES and q_segment_ids is None:
        return decode_attention(
            q, view.k, view.v, lengths=view.lengths, q_positions=q_positions,
            kv_positions=view.positions, mask=mask, kv_layout=view.layout, **common,
        )
    k, v = view.kv("BSKH")
    kv_positions = slot_positions(view) if view.lengths is not None else view.positions
    return flash_attention(
        q, k, v, q_positions=q_positions, kv_positions=kv_positions,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, **common,
    )


register_implementation("pallas_tpu", pallas_tpu_attention)


def _kernel_options(spec: AttentionSpec) -> dict:
    return dict(causal=spec.causal, window=spec.window, softcap=spec.softcap, scale=spec.scale,
                interpret=_interpret())


def pallas_tpu_paged_attention(
    q: jax.Array, view: PagedView, *, spec: AttentionSpec, q_positions: jax.Array | None,
    q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None, mask: jax.Array | None,
    return_lse: bool, key_stats: KeyStats | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """T <= 16 queries over a paged view: the pages are read in place through the
    scalar-prefetched page table (PagedAttention, Kwon et al. 2023)."""
    del q_segment_ids, kv_segment_ids, key_stats  # not served (declared in the table)
    lengths = view.lengths if view.lengths is not None else jnp.full((q.shape[0],), view.num_slots, jnp.int32)
    return paged_decode_attention(q, view.k_pages, view.v_pages, view.page_table, lengths,
                                  q_positions=q_positions, page_positions=view.positions, mask=mask,
                                  return_lse=return_lse, **_kernel_options(spec))


def pallas_tpu_quantized_attention(
    q: jax.Array, view: QuantizedView, *, spec: AttentionSpec, q_positions: jax.Array | None,
    q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None, mask: jax.Array | None,
    return_lse: bool, key_stats: KeyStats | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """T <= 16 queries over a KIVI view: the kernel dequantizes the packed store block by
    block (KIVI, Liu et al. 2024); the full-precision residual is attended by XLA and the
    two are merged by their log-sum-exps."""
    del q_segment_ids, kv_segment_ids, key_stats  # not served (declared in the table)
    b, t = q.shape[:2]
    stored = view.num_quantized
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(view.num_slots - t, view.num_slots, dtype=jnp.int32), (b, t))
    lengths = view.lengths if view.lengths is not None else jnp.full((b,), stored, jnp.int32)
    packed_mask = None if mask is None else mask[:, :, :stored]
    packed = quantized_decode_attention(
        q, view.k_codes, view.k_scale, view.k_zero, view.v_codes, view.v_scale, view.v_zero, lengths,
        bits=view.bits, group_size=view.group_size, q_positions=q_positions, kv_positions=view.positions,
        mask=packed_mask, **_kernel_options(spec))
    residual = attend_slots(q, view.residual_k, view.residual_v, view.residual_positions.astype(jnp.int32),
                            spec=spec, q_positions=q_positions, mask=None if mask is None else mask[:, :, stored:])
    out, lse = merge_partials(packed, residual)
    return pack_outputs(out.astype(q.dtype), lse, None, return_lse)


register_implementation("pallas_tpu_paged", pallas_tpu_paged_attention)
register_implementation("pallas_tpu_quantized", pallas_tpu_quantized_attention)
