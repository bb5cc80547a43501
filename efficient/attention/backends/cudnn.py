"""The "cudnn" attention implementation: jax.nn.dot_product_attention on cuDNN.

cuDNN's fused attention serves the common prefill case: float16/bfloat16,
head_dim 64 or 128, default positions (queries are the last T of the S keys),
causal or not, a causal left window. It has no log-sum-exp output, soft-capping,
segment ids, positions, lengths or arbitrary masks through this API; the
capability table (`capabilities.CAPABILITIES["cudnn"]`) declares so and the
dispatcher never calls it for those cases.
"""

from __future__ import annotations

import jax

from efficient.attention.dispatcher import register_implementation
from efficient.attention.spec import AttentionSpec, KeyStats
from efficient.attention.views import DenseView


def cudnn_attention(
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
) -> jax.Array:
    """Dispatcher adapter (the capability table has already admitted the case)."""
    del q_positions, q_segment_ids, kv_segment_ids, mask, return_lse, key_stats  # refused by the table
    return jax.nn.dot_product_attention(
        q,
        view.k,
        view.v,
        scale=spec.logit_scale(q.shape[-1]),
        is_causal=spec.causal,
        local_window_size=None if spec.window is None else (spec.window - 1, 0),
        implementation="cudnn",
    )


register_implementation("cudnn", cudnn_attention)
