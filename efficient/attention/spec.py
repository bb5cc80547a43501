"""What an attention call computes, independent of how (the implementation).

`AttentionSpec` holds the static switches (causal, window, soft-cap, scale);
`AttentionInputs` validation lives in `validate_inputs`. Masking is defined by
*positions*, not by slot indices, so caches that reorder or drop entries
(evicting, paged, tree-compacted) keep exact semantics:

    key s is visible to query t  iff  kv_positions[b, s] >= 0
                                  and q_positions[b, t] >= 0
                                  and (not causal  or kv_pos <= q_pos)
                                  and (window None or q_pos - kv_pos < window)
                                  and segment ids equal (when given)
                                  and mask[b, t, s]     (when given)

A negative position marks padding (an empty cache slot or a padded query).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static description of one attention call.

    causal: keys at later positions than the query are hidden.
    window: left window size W: a query sees keys with q_pos - kv_pos < W
        (Mistral / Longformer-style sliding window; W includes the query itself).
    softcap: logits become softcap * tanh(logits / softcap) (Gemma 2 style).
    scale: logit scale; None means 1/sqrt(head_dim).
    """

    causal: bool = True
    window: int | None = None
    softcap: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.window is not None and (
            not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1
        ):
            raise ValueError(f"AttentionSpec.window must be a positive int or None, got {self.window!r}")
        if not isinstance(self.causal, bool | np.bool_):
            raise TypeError(f"AttentionSpec.causal must be a bool, got {type(self.causal).__name__} {self.causal!r}")
        for name in ("softcap", "scale"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"AttentionSpec.{name} must be a number or None, got {type(value).__name__} {value!r}")
            if not (math.isfinite(value) and value > 0):  # inf would give NaN logits (inf * tanh(0))
                raise ValueError(f"AttentionSpec.{name} must be finite and > 0 or None, got {value!r}")

    def logit_scale(self, head_dim: int) -> float:
        return self.scale if self.scale is not None else head_dim**-0.5


def default_positions(
    batch: int, q_len: int, kv_len: int
) -> tuple[Int[Array, "B T"], Int[Array, "B S"]]:
    """Positions of the usual layout: the T queries are the last T of the S keys."""
    q_pos = jnp.arange(kv_len - q_len, kv_len, dtype=jnp.int32)
    kv_pos = jnp.arange(kv_len, dtype=jnp.int32)
    return (
        jnp.broadcast_to(q_pos, (batch, q_len)),
        jnp.broadcast_to(kv_pos, (batch, kv_len)),
    )


def visibility_mask(
    spec: AttentionSpec,
    q_positions: Int[Array, "B T"],
    kv_positions: Int[Array, "B S"],
    *,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    mask: Bool[Array, "B T S"] | None = None,
) -> Bool[Array, "B T S"] | Bool[Array, "B K T S"]:
    """The boolean mask of the module docstring, materialised (reference use); [B, K, T, S]
    when `kv_positions` is per KV head ([B, K, S]: each head holds its own tokens)."""
    if kv_positions.ndim == 3:
        def one_head(kv: jax.Array) -> jax.Array:
            return visibility_mask(spec, q_positions, kv, q_segment_ids=q_segment_ids,
                                   kv_segment_ids=kv_segment_ids, mask=mask)
        return jax.vmap(one_head, in_axes=1, out_axes=1)(kv_positions)
    qp = q_positions[:, :, None]
    kp = kv_positions[:, None, :]
    visible = (qp >= 0) & (kp >= 0)
    if spec.causal:
        visible &= kp <= qp
    if spec.window is not None:
        visible &= qp - kp < spec.window
    if q_segment_ids is not None or kv_segment_ids is not None:
        if q_segment_ids is None or kv_segment_ids is None:
            raise ValueError("q_segment_ids and kv_segment_ids must be given together")
        visible &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if mask is not None:
        visible &= mask
    return visible


def validate_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array | None,
    kv_positions: jax.Array | None,
    mask: jax.Array | None,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
) -> None:
    """Shape/dtype checks shared by every implementation; raises ValueError/TypeError."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [B, T|S, N|K, H], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating dtype, got {x.dtype}")
    b, t, n, h = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must agree on [B, S, K, H], got k {k.shape} and v {v.shape}")
    if k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"k shape {k.shape} does not match q shape {q.shape} on batch or head_dim")
    kv_heads = k.shape[2]
    if n % kv_heads:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kv_heads}")
    s = k.shape[1]
    checks = (
        ("q_positions", q_positions, (b, t)),
        ("kv_positions", kv_positions, (b, kv_heads, s) if getattr(kv_positions, "ndim", 2) == 3 else (b, s)),
        ("q_segment_ids", q_segment_ids, (b, t)),
        ("kv_segment_ids", kv_segment_ids, (b, s)),
        ("mask", mask, (b, t, s)),
    )
    for name, x, shape in checks:
        if x is None:
            continue
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        want_bool = name == "mask"
        if want_bool and x.dtype != jnp.bool_:
            raise TypeError(f"mask must be bool, got {x.dtype}")
        if not want_bool and not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer dtype, got {x.dtype}")


@dataclasses.dataclass(frozen=True)
class KeyStats:
    """A static request for per-slot attention mass [B, S]: the softmax probabilities
    summed over the named query heads and query indices (None: all), e.g. the
    accumulated attention score of H2O (Zhang et al. 2023) or the observation-window
    vote of SnapKV (Li et al. 2024). `attention(..., key_stats=True)` means all.

    per_kv_head: keep the KV-head axis (summed over each head's G query heads only):
        [B, K, S], what a cache that evicts per KV head scores with.
    per_query: keep the query axis: [B, (K,) T, S], so the cache can weigh queries
        by their positions (an observation window that skips padding).
    tail: the mass of the view's last `tail` slots only ([..., tail] in place of
        [..., S]): a quantized view's full-precision residual, the only slots
        ZipCache still has to score; the xla path then keeps its blockwise read."""

    heads: tuple[int, ...] | None = None
    queries: tuple[int, ...] | None = None
    per_kv_head: bool = False
    per_query: bool = False
    tail: int | None = None

    def __post_init__(self) -> None:
        for name in ("per_kv_head", "per_query"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"KeyStats.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("heads", "queries"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, tuple) or not value
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in value)
            ):
                raise ValueError(f"KeyStats.{name} must be a non-empty tuple of ints or None, got {value!r}")
        if self.tail is not None and (not isinstance(self.tail, int) or isinstance(self.tail, bool) or self.tail < 1):
            raise ValueError(f"KeyStats.tail must be a positive int or None, got {self.tail!r}")

    @classmethod
    def of(cls, request: KeyStats | bool | None) -> KeyStats | None:
        """Normalise `attention`'s key_stats argument (True: every head and query)."""
        if request is None or request is False:
            return None
        if request is True:
            return cls()
        if isinstance(request, cls):
            return request
        raise TypeError(f"key_stats must be a KeyStats, a bool or None, got {request!r}")
