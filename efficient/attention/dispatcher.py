"""One entry point for attention: `attention(q, view, *, spec, ..., implementation)`.

Implementations register under a name with their capabilities
(efficient/attention/capabilities.py). `implementation` is a name, an ordered
sequence of names, or None (the default order for the current backend). The
dispatcher picks, at trace time and before calling anything, the first
candidate whose capabilities cover the call, logs the choice (logger
"efficient.attention", debug level) and calls it; an error raised inside an
implementation propagates. `"xla"` serves every view and spec; `"reference"`
is the float32 oracle. Model layers call only this function.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from efficient.attention.capabilities import CAPABILITIES, Capabilities, unsupported
from efficient.attention.spec import AttentionSpec, KeyStats, validate_inputs
from efficient.attention.page_select import QuestView
from efficient.attention.views import QUANTIZED_VIEWS, VIEW_TYPES, DenseView, KVView
from efficient.attention.xla import reference_implementation, xla_implementation

logger = logging.getLogger("efficient.attention")


class AttentionImplementation(Protocol):
    def __call__(
        self,
        q: jax.Array,
        view: KVView,
        *,
        spec: AttentionSpec,
        q_positions: jax.Array | None,
        q_segment_ids: jax.Array | None,
        kv_segment_ids: jax.Array | None,
        mask: jax.Array | None,
        return_lse: bool,
        key_stats: KeyStats | None,
    ) -> jax.Array | tuple[jax.Array, ...]: ...


_REGISTRY: dict[str, AttentionImplementation] = {}

# Default order of preference per JAX backend; names not registered are skipped.
DEFAULT_ORDER: dict[str, tuple[str, ...]] = {
    "tpu": ("pallas_tpu", "pallas_tpu_paged", "pallas_tpu_quantized", "xla"),
    "gpu": ("pallas_gpu", "cudnn", "xla"),
    "cuda": ("pallas_gpu", "cudnn", "xla"),
    "cpu": ("xla",),
}


def register_implementation(
    name: str, fn: AttentionImplementation, capabilities: Capabilities | None = None
) -> None:
    """Make `fn` selectable as `implementation=name` (later registration wins). Its
    capabilities are `capabilities`, else the entry `name` of the table."""
    if capabilities is not None:
        CAPABILITIES[name] = capabilities
    elif name not in CAPABILITIES:
        raise ValueError(f"implementation {name!r} has no entry in the capability table; pass capabilities")
    _REGISTRY[name] = fn


def unregister_implementation(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_implementations() -> tuple[str, ...]:
    return tuple(_REGISTRY)


register_implementation("xla", xla_implementation)
# The float32 oracle itself, selectable by name (never chosen automatically).
register_implementation("reference", reference_implementation)


def resolve_order(implementation: str | Sequence[str] | None) -> tuple[str, ...]:
    """The candidate names to try, validated against the registry."""
    if implementation is None:
        order = DEFAULT_ORDER.get(jax.default_backend(), ("xla",))
        return tuple(name for name in order if name in _REGISTRY) or ("xla",)
    if not isinstance(implementation, str | Sequence) or (
        not isinstance(implementation, str) and not all(isinstance(name, str) for name in implementation)
    ):
        raise TypeError(f"implementation must be a name, a sequence of names or None, got {implementation!r}")
    names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
    if not names:
        raise ValueError("implementation must name at least one implementation, got an empty sequence")
    for name in names:
        if name not in _REGISTRY:
            raise ValueError(
                f"unknown attention implementation {name!r}; registered: {sorted(_REGISTRY)}"
            )
    return names


def _validate(q: jax.Array, view: KVView, q_positions, mask, q_segment_ids, kv_segment_ids) -> None:  # noqa: ANN001
    if isinstance(view, DenseView):
        k, v, kv_positions = view.k, view.v, view.positions
        if view.layout == "BKSH" and k.ndim == v.ndim == 4:  # check in the logical [B, S, K, H] order
            k, v = (jax.ShapeDtypeStruct((x.shape[0], x.shape[2], x.shape[1], x.shape[3]), x.dtype) for x in (k, v))
        if view.lengths is not None and (
            tuple(view.lengths.shape) != (q.shape[0],) or not jnp.issubdtype(view.lengths.dtype, jnp.integer)
        ):
            raise ValueError(f"DenseView.lengths must be integer [B={q.shape[0]}], got "
                             f"{view.lengths.dtype}{tuple(view.lengths.shape)}")
    else:
        view.validate()
        k = v = jax.ShapeDtypeStruct(
            (view.batch_size, view.num_slots, view.num_kv_heads, view.head_dim), view.dtype
        )
        kv_positions = None
    validate_inputs(q, k, v, q_positions, kv_positions, mask, q_segment_ids, kv_segment_ids)


def attention(
    q: Float[Array, "B T N H"],
    view: KVView,
    *,
    spec: AttentionSpec = AttentionSpec(),
    q_positions: Int[Array, "B T"] | None = None,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    mask: Bool[Array, "B T S"] | None = None,
    return_lse: bool = False,
    key_stats: KeyStats | bool | None = None,
    implementation: str | Sequence[str] | None = None,
):  # noqa: ANN201
    """Attention of queries `q` over the keys/values of `view` (`DenseView(k, v, positions)`
    for plain arrays), by the first implementation in `implementation` that serves it.

    Returns out [B, T, N, H]; with `return_lse` also the float32 log-sum-exp
    [B, T, N]; with `key_stats` (True or a `KeyStats`) also the float32 per-slot
    attention mass [B, S] over the view's logical slots: `out`, `(out, lse)`,
    `(out, mass)` or `(out, lse, mass)`. Masking: see `efficient.attention.spec`;
    when `q_positions` is None and a dense or paged view has lengths, the T queries
    are the last T tokens of each row (positions lengths[b] - T + t).
    """
    if not isinstance(q, jax.Array | np.ndarray):
        raise TypeError(f"q must be a float array [B, T, N, H], got {type(q).__name__}")
    if not isinstance(view, VIEW_TYPES):
        raise TypeError(
            "view must be a KV view (DenseView, PagedView, QuantizedView, LowBitView, MixedPrecisionView, QuestView), got "
            f"{type(view).__name__}"
        )
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}: {spec!r}")
    key_stats = KeyStats.of(key_stats)
    if key_stats is not None and isinstance(view, QuestView):
        raise ValueError("key_stats is not served over a QuestView (its attention reads selected pages only); "
                         "a cache that scores keys cannot also select pages")
    if key_stats is not None and key_stats.tail is not None and key_stats.tail > view.num_slots:
        raise ValueError(f"key_stats.tail={key_stats.tail} exceeds the view's {view.num_slots} slots")
    _validate(q, view, q_positions, mask, q_segment_ids, kv_segment_ids)
    if q_positions is None and view.lengths is not None and not isinstance(view, QUANTIZED_VIEWS):
        t = q.shape[1]
        q_positions = view.lengths.astype(jnp.int32)[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None, :]
    call = dict(
        q_positions=q_positions,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        mask=mask,
        return_lse=return_lse,
        key_stats=key_stats,
    )
    reasons: list[str] = []
    for name in resolve_order(implementation):
        reason = unsupported(name, q, view, spec, **call)
        if reason is None:
            logger.debug(
                "attention: %s for q %s %s over %s, %s (passed over: %s)",
                name, q.dtype, tuple(q.shape), type(view).__name__, spec, "; ".join(reasons) or "none",
            )
            return _REGISTRY[name](q, view, spec=spec, **call)
        reasons.append(f"{name}: {reason}")
    raise NotImplementedError("no attention implementation serves this call: " + "; ".join(reasons))
