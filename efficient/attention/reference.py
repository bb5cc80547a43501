"""The attention oracle: plain jnp, float32, any mask, GQA without repeats.

Every kernel and variant in the project is tested against `attention_reference`.
A fully masked query row returns zeros (and log-sum-exp -inf), never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from efficient.attention.spec import (
    AttentionSpec,
    KeyStats,
    default_positions,
    validate_inputs,
    visibility_mask,
)


def masked_softmax_attention(
    logits: Float[Array, "B K G T S"],
    visible: Bool[Array, "B 1 1 T S"],
    v: Float[Array, "B S K H"] | Float[Array, "B K S H"],
    pv_dtype: jnp.dtype = jnp.float32,
    kv_layout: str = "BSKH",
    want_probs: bool = False,
) -> tuple[Float[Array, "B K G T H"], Float[Array, "B K G T"], Float[Array, "B K G T S"] | None]:
    """Softmax over S restricted to visible keys, statistics in float32; zeros for
    empty rows. The P.V product runs in `pv_dtype` with float32 accumulation.
    Also returns the probabilities when `want_probs` (else None)."""
    logits = jnp.where(visible, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    v_sub = "bskh" if kv_layout == "BSKH" else "bksh"
    out = jnp.einsum(f"bkgts,{v_sub}->bkgth", p.astype(pv_dtype), v.astype(pv_dtype),
                     preferred_element_type=jnp.float32)
    safe = jnp.where(denom == 0, 1.0, denom)
    out = out / safe
    lse = jnp.where(denom[..., 0] > 0, row_max[..., 0] + jnp.log(denom[..., 0]), -jnp.inf)
    return out, lse, (p / safe if want_probs else None)


def key_mass(probs: Float[Array, "B K G T S"], request: KeyStats) -> Float[Array, "B *KT S"]:
    """Softmax probabilities summed over the requested query heads (n = k * G + g) and
    queries: [B, S], or [B, K, S] / [B, T, S] / [B, K, T, S] as `request` keeps axes
    (S: the last `request.tail` slots only, when set)."""
    if request.tail is not None:
        probs = probs[..., -request.tail:]
    b, kh, g, t, s = probs.shape
    if request.heads is not None:
        weights = jnp.zeros((kh * g,), probs.dtype).at[jnp.asarray(request.heads, jnp.int32)].set(1.0)
        probs = probs * weights.reshape(1, kh, g, 1, 1)
    if request.queries is not None:
        probs = probs[:, :, :, jnp.asarray(request.queries, jnp.int32)]
    mass = jnp.sum(probs, axis=2)  # B K T S
    if not request.per_query:
        mass = jnp.sum(mass, axis=2)
    return mass if request.per_kv_head else jnp.sum(mass, axis=1)


def pack_outputs(out: jax.Array, lse: jax.Array | None, mass: jax.Array | None, return_lse: bool):  # noqa: ANN201
    """out, (out, lse), (out, mass) or (out, lse, mass): the dispatcher's return convention."""
    extra = ((lse,) if return_lse else ()) + ((mass,) if mass is not None else ())
    return (out, *extra) if extra else out


def grouped_visibility(
    spec: AttentionSpec, q_positions: Int[Array, "B T"], kv_positions: Int[Array, "B S"] | Int[Array, "B K S"],
    q_segment_ids: Int[Array, "B T"] | None, kv_segment_ids: Int[Array, "B S"] | None,
    mask: Bool[Array, "B T S"] | None,
) -> Bool[Array, "B _K 1 T S"]:
    """The spec's visibility rule, shaped to broadcast against [B, K, G, T, S] logits."""
    visible = visibility_mask(spec, q_positions, kv_positions, q_segment_ids=q_segment_ids,
                              kv_segment_ids=kv_segment_ids, mask=mask)
    return visible[:, :, None] if visible.ndim == 4 else visible[:, None, None]


def grouped_logits(
    q: Float[Array, "B T N H"], k: Float[Array, "B S K H"] | Float[Array, "B K S H"], *, spec: AttentionSpec,
    exact: bool, kv_layout: str = "BSKH",
) -> Float[Array, "B K G T S"]:
    """Scaled (and soft-capped) float32 logits of each query head against its KV head's keys."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2 if kv_layout == "BSKH" else 1]
    compute = jnp.float32 if exact else q.dtype
    qg = q.astype(compute).reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum(
        "btkgh,bskh->bkgts" if kv_layout == "BSKH" else "btkgh,bksh->bkgts", qg, k.astype(compute),
        preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST if exact else None,
    )
    logits = logits * spec.logit_scale(h)
    if spec.softcap is not None:
        logits = spec.softcap * jnp.tanh(logits / spec.softcap)
    return logits


def grouped_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"] | Float[Array, "B K S H"],
    v: Float[Array, "B S K H"] | Float[Array, "B K S H"],
    *,
    spec: AttentionSpec,
    q_positions: Int[Array, "B T"] | None,
    kv_positions: Int[Array, "B S"] | None,
    q_segment_ids: Int[Array, "B T"] | None,
    kv_segment_ids: Int[Array, "B S"] | None,
    mask: Bool[Array, "B T S"] | None,
    return_lse: bool,
    exact: bool,
    kv_layout: str = "BSKH",
    key_stats: KeyStats | None = None,
):  # noqa: ANN201  (out, and lse / key mass as requested: see `pack_outputs`)
    """Materialised GQA attention shared by the oracle and the "xla" implementation.

    exact: matmuls in float32 at HIGHEST precision (the oracle); otherwise in the
    input dtype with float32 accumulation, K/V never upcast. kv_layout: "BSKH" or
    "BKSH" (read in place by the einsums). key_stats: also return the per-slot mass.
    """
    b, t, n, h = q.shape
    s = k.shape[1 if kv_layout == "BSKH" else 2]
    if q_positions is None or kv_positions is None:
        dq, dk = default_positions(b, t, s)
        q_positions = dq if q_positions is None else q_positions
        kv_positions = dk if kv_positions is None else kv_positions
    visible = grouped_visibility(spec, q_positions, kv_positions, q_segment_ids, kv_segment_ids, mask)
    compute = jnp.float32 if exact else q.dtype
    logits = grouped_logits(q, k, spec=spec, exact=exact, kv_layout=kv_layout)
    out, lse, probs = masked_softmax_attention(
        logits, visible, v, pv_dtype=compute, kv_layout=kv_layout, want_probs=key_stats is not None
    )
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h).astype(q.dtype)
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, n) if return_lse else None
    mass = key_mass(probs, key_stats) if key_stats is not None else None
    return pack_outputs(out, lse, mass, return_lse)


def attention_reference(
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
    """Exact attention (see `efficient.attention.spec` for the masking rule).

    Returns output in q.dtype and, if `return_lse`, the float32 natural-log
    log-sum-exp of the scaled (and soft-capped) logits per query head.
    """
    validate_inputs(q, k, v, q_positions, kv_positions, mask, q_segment_ids, kv_segment_ids)
    return grouped_attention(
        q, k, v, spec=spec, q_positions=q_positions, kv_positions=kv_positions,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, mask=mask,
        return_lse=return_lse, exact=True,
    )
