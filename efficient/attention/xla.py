"""The always-available production attention: plain XLA in the input dtype.

Same semantics as `attention_reference` (masking by positions, zeros for
fully masked rows, optional log-sum-exp), but the matmuls run in the input
dtype with float32 accumulation and default precision, and K/V are never
copied to float32 (the reference upcasts everything and uses HIGHEST
precision). It still materialises the [B, K, G, T, S] logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from efficient.attention.reference import masked_softmax_attention
from efficient.attention.spec import AttentionSpec, default_positions, visibility_mask


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
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    if q_positions is None or kv_positions is None:
        dq, dk = default_positions(b, t, s)
        q_positions = dq if q_positions is None else q_positions
        kv_positions = dk if kv_positions is None else kv_positions
    visible = visibility_mask(spec, q_positions, kv_positions, q_segment_ids=q_segment_ids,
                              kv_segment_ids=kv_segment_ids, mask=mask)[:, None, None]  # B 1 1 T S
    qg = q.reshape(b, t, kv_heads, g, h)
    k = k.astype(q.dtype)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * spec.logit_scale(h)
    if spec.softcap is not None:
        logits = spec.softcap * jnp.tanh(logits / spec.softcap)
    out, lse = masked_softmax_attention(logits, visible, v, pv_dtype=q.dtype)
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h).astype(q.dtype)
    if not return_lse:
        return out
    return out, jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, n)


