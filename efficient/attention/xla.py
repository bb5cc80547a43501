"""The always-available production attention: plain XLA in the input dtype.

Same semantics as `attention_reference` (masking by positions, zeros for
fully masked rows, optional log-sum-exp), but the matmuls run in the input
dtype with float32 accumulation and default precision, and K/V are never
copied to float32 (the reference upcasts everything and uses HIGHEST
precision). It still materialises the [B, K, G, T, S] logits.
"""

from __future__ import annotations

from jaxtyping import Array, Bool, Float, Int

from efficient.attention.reference import grouped_attention
from efficient.attention.spec import AttentionSpec


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
