"""The "pallas_tpu" attention implementation: Pallas Mosaic TPU kernels.

Routing: T <= 16 queries without segment ids go to the split-K decode kernel
(which also takes an arbitrary `mask`, e.g. a tree mask, and reads a
`DenseView` in place in either layout, skipping the key blocks past each row's
length or before its window); everything else to the flash kernel
(causal/window/soft-cap/segment ids by positions, no `mask`; it reads
[B, S, K, H], so a "BKSH" view is transposed for it: prefill cost, once per
call). What is served is declared in `capabilities.CAPABILITIES["pallas_tpu"]`.
On CPU the kernels run in TPU interpret mode (slow; for tests and debugging).
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

from efficient.attention.dispatcher import register_implementation
from efficient.attention.spec import AttentionSpec, KeyStats
from efficient.attention.views import DenseView, slot_positions
from kernels_pallas.decode_attention import MAX_QUERIES, decode_attention
from kernels_pallas.flash_attention import flash_attention


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
