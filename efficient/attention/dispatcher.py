"""One entry point for attention: `attention(q, view, *, spec, ..., implementation)`.

Implementations register under a name. `implementation` is a name, an ordered
sequence of names, or None (the default order for the current backend). Each
candidate is tried in order; one that cannot serve the case raises
`NotImplementedError` and the next is tried. `"xla"` always works;
`"reference"` is the float32 oracle.
Model layers call only this function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import jax
from jaxtyping import Array, Bool, Float, Int

from efficient.attention.reference import attention_reference
from efficient.attention.spec import AttentionSpec, validate_inputs
from efficient.attention.views import DenseView, KVView
from efficient.attention.xla import attention_xla

class AttentionImplementation(Protocol):
    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        spec: AttentionSpec,
        q_positions: jax.Array | None,
        kv_positions: jax.Array | None,
        q_segment_ids: jax.Array | None,
        kv_segment_ids: jax.Array | None,
        mask: jax.Array | None,
        return_lse: bool,
    ) -> jax.Array | tuple[jax.Array, jax.Array]: ...

_REGISTRY: dict[str, AttentionImplementation] = {}

# Default order of preference per JAX backend; names not registered are skipped.
DEFAULT_ORDER: dict[str, tuple[str, ...]] = {
    "tpu": ("pallas_tpu", "xla"),
    "gpu": ("pallas_gpu", "cudnn", "xla"),
    "cuda": ("pallas_gpu", "cudnn", "xla"),
    "cpu": ("xla",),
}

def register_implementation(name: str, fn: AttentionImplementation) -> None:
    """Make `fn` selectable as `implementation=name` (later registration wins)."""
    _REGISTRY[name] = fn

def registered_implementations() -> tuple[str, ...]:
    return tuple(_REGISTRY)

register_implementation("xla", attention_xla)
# The float32 oracle itself, selectable by name (never chosen automatically).
register_implementation("reference", attention_reference)

def resolve_order(implementation: str | Sequence[str] | None) -> tuple[str, ...]:
    """The candidate names to try, validated against the registry."""
    if implementation is None:
        order = DEFAULT_ORDER.get(jax.default_backend(), ("xla",))
        return tuple(name for name in order if name in _REGISTRY) or ("xla",)
    names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
    if not names:
        raise ValueError("implementation must name at least one implementation, got an empty sequence")
    for name in names:
        if name not in _REGISTRY:
            raise ValueError(
                f"unknown attention implementation {name!r}; registered: {sorted(_REGISTRY)}"
            )
    return names

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
    implementation: str | Sequence[str] | None = None,
) -> Float[Array, "B T N H"] | tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Attention of queries `q` over the keys/values of `view` (a `DenseView` for plain
    arrays: `DenseView(k, v, kv_positions)`), by the first implementation in
    `implementation` that serves the case."""
    if not isinstance(view, DenseView):
        raise TypeError(f"view must be a KV view such as DenseView(k, v, positions), got {type(view).__name__}")
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}: {spec!r}")
    k, v, kv_positions = view.k, view.v, view.positions
    validate_inputs(q, k, v, q_positions, kv_positions, mask, q_segment_ids, kv_segment_ids)
    kwargs = dict(
        spec=spec,
        q_positions=q_positions,
        kv_positions=kv_positions,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        mask=mask,
        return_lse=return_lse,
    )
    reasons: list[str] = []
    for name in resolve_order(implementation):
        try:
            return _REGISTRY[name](q, k, v, **kwargs)
        except NotImplementedError as err:
            reasons.append(f"{name}: {err}")
    raise NotImplementedError(
        "no attention implementation served this case: " + "; ".join(reasons)
    )

AttentionFn = Callable[..., jax.Array]
