"""The always-available production attention: plain XLA in the input dtype.

Same semantics as `attention_reference` (masking by positions, zeros for
fully masked rows, optional log-sum-exp), but the matmuls run in the input
dtype with float32 accumulation and default precision, and K/V are never
copied to float32 (the reference upcasts everything and uses HIGHEST
precision). It still materialises the [B, K, G, T, S] logits.

`xla_implementation` serves every view type: a dense view is read in its
stored layout; a paged or quantized view is read one key block at a time (a
block of pages through the page table, or a dequantized block of codes) with an
online softmax across blocks (`view_blocks.attention_over_blocks`), never as a
whole dense float copy. The float32 oracle (`reference_implementation`) and
requests for key statistics use the materialised path (`views.dense_kv`), except a
request for a quantized view's residual only (`KeyStats.tail` = R, ZipCache's), which
the block loop serves from the residual's logits and the final log-sum-exp. A
dense view whose shape `prefers_blockwise` goes to the online-softmax
`attention_blockwise` (never materialises the logits; its gradient is the
materialised path's, recomputed in the backward pass). Decoding over a
[B, K, S, H] view (the dense cache's) of 2048 slots or more picks at run time
(`lax.cond` on the row lengths): blockwise while the fullest row holds at most
half the slots (it skips the empty key blocks), materialised past that (it reads
the cache in place, where the blockwise loop copies each key block). A `QuestView` is read
as the dense view of its selected pages (or of the whole cache where it does not select).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from efficient.attention.blockwise import DECODE_SPARSE_FILL, attention_blockwise, prefers_blockwise
from efficient.attention.page_select import QuestView, quest_attention
from efficient.attention.reference import grouped_attention
from efficient.attention.spec import AttentionSpec, KeyStats, default_positions
from efficient.attention.view_blocks import attention_over_blocks
from efficient.attention.views import QUANTIZED_VIEWS, DenseView, KVView, dense_kv, slot_positions


def attention_xla(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    spec: AttentionSpec = AttentionSpec(),
    q_positions: Int[Array, "B T"] | None = None,
    kv_positions: Int[Array, "B S"] | None = None,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    mask: Bool[Array, "B T S"] | None = None,
    return_lse: bool = False,
) -> Float[Array, "B T N H"] | tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    return grouped_attention(
        q, k, v, spec=spec, q_positions=q_positions, kv_positions=kv_positions,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, mask=mask,
        return_lse=return_lse, exact=False,
    )


def view_arrays(view: KVView) -> tuple[jax.Array, jax.Array, jax.Array | None, str]:
    """(k, v, kv_positions, layout) of any view for the materialised path.

    A dense view without lengths is passed through untouched. Otherwise slots
    past a row's length (or empty slots of a page/residual) get position -1 and
    their values are zeroed, so that whatever they hold (NaN included) cannot
    reach the output through a zero probability times a non-finite value."""
    if isinstance(view, DenseView) and view.lengths is None:
        return view.k, view.v, view.positions, view.layout
    layout = view.layout if isinstance(view, DenseView) else "BSKH"
    k, v = dense_kv(view, layout)
    positions = slot_positions(view)
    live = positions >= 0
    if live.ndim == 3:  # per KV head [B, K, S]
        live = jnp.swapaxes(live, 1, 2)[..., None] if layout == "BSKH" else live[..., None]
    else:
        live = live[:, :, None, None] if layout == "BSKH" else live[:, None, :, None]
    return k, jnp.where(live, v, jnp.zeros((), v.dtype)), positions, layout


def _view_attention(exact: bool):  # noqa: ANN202
    def implementation(
        q: Float[Array, "B T N H"],
        view: KVView,
        *,
        spec: AttentionSpec,
        q_positions: Int[Array, "B T"] | None = None,
        q_segment_ids: Int[Array, "B T"] | None = None,
        kv_segment_ids: Int[Array, "B S"] | None = None,
        mask: Bool[Array, "B T S"] | None = None,
        return_lse: bool = False,
        key_stats: KeyStats | None = None,
    ):  # noqa: ANN202
        if isinstance(view, QuestView):  # the selected pages (or all), as dense views
            def over(q: jax.Array, seen: DenseView, mask: jax.Array | None, kv_segment_ids: jax.Array | None):  # noqa: ANN202
                return implementation(q, seen, spec=spec, q_positions=q_positions, q_segment_ids=q_segment_ids,
                                      kv_segment_ids=kv_segment_ids, mask=mask, return_lse=return_lse)
            return quest_attention(q, view, over, q_positions=q_positions, mask=mask, kv_segment_ids=kv_segment_ids,
                                   scale=spec.logit_scale(view.head_dim))

        def materialised(q: jax.Array, view: KVView):  # noqa: ANN202
            k, v, kv_positions, layout = view_arrays(view)
            return grouped_attention(
                q, k, v, spec=spec, q_positions=q_positions, kv_positions=kv_positions,
                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, mask=mask,
                return_lse=return_lse, exact=exact, kv_layout=layout, key_stats=key_stats,
            )

        def blockwise(q: jax.Array, view: DenseView):  # noqa: ANN202
            return attention_blockwise(q, view.k, view.v, spec=spec, q_positions=q_positions,
                                       kv_positions=view.positions, q_segment_ids=q_segment_ids,
                                       kv_segment_ids=kv_segment_ids, mask=mask, return_lse=return_lse,
                                       lengths=view.lengths, kv_layout=view.layout)

        if (not exact and key_stats is None and isinstance(view, DenseView)
                and (view.positions is None or view.positions.ndim == 2)):
            prefer = prefers_blockwise(q.shape[1], view.num_slots, view.layout)
            if prefer == "sparse" and view.lengths is not None:  # run-time choice by fill
                sparse = jnp.max(view.lengths) <= int(DECODE_SPARSE_FILL * view.num_slots)
                return jax.lax.cond(sparse, blockwise, materialised, q, view)
            if prefer is True:
                return blockwise(q, view)
        residual_stats = (key_stats is not None and isinstance(view, QUANTIZED_VIEWS)
                          and key_stats.tail == view.residual_k.shape[1])
        if not exact and (key_stats is None or residual_stats) and not isinstance(view, DenseView):
            if q_positions is None:
                q_positions = default_positions(q.shape[0], q.shape[1], view.num_slots)[0]
            return attention_over_blocks(q, view, spec=spec, q_positions=q_positions, q_segment_ids=q_segment_ids,
                                         kv_segment_ids=kv_segment_ids, mask=mask, return_lse=return_lse,
                                         key_stats=key_stats)
        return materialised(q, view)

    return implementation


xla_implementation = _view_attention(exact=False)
xla_implementation.__doc__ = """The "xla" implementation: any view, input dtype, float32 statistics."""
reference_implementation = _view_attention(exact=True)
reference_implementation.__doc__ = """The "reference" implementation: the float32 oracle on any view."""
