"""The protocol every KV cache implements, as pure functions on a pytree.

A cache holds per-layer keys and values in *slots*; each slot carries the
token position it holds (-1 for an empty slot). Attention masks by positions,
so a cache may reorder, drop, quantize or page its slots freely.

Lifecycle of one forward over T new tokens (all layers):
    cache, slots = cache.reserve(positions)          # once per forward
    cache = cache.update(layer, k, v, slots)         # per layer
    view = cache.view(layer)                         # per layer: what attention reads
`reserve` appends: the new tokens of row b take the logical slots
lengths[b] + t, t = 0..T-1 (a paged layout maps logical slots to pages), so
a caller can name the slots of what it just wrote (the speculative verifier
commits an accepted tree path with `select` this way). The view is indexed by slot: entry s of `view(layer)` is slot s (what
`reserve` returned), so a mask over new tokens can be placed by their slots.
Speculative decoding rolls back with `truncate(lengths)` and compacts an
accepted tree path with `select(source_slots, counts, start)`.
`view(layer, window)` is told the attending layer's sliding window (None: full
attention): a cache may keep fewer slots for windowed layers (`HybridKVCache`). A
cache whose views differ in shape by window says so with `views_differ_by_window`
and maps a mask over logical slots onto its view with `view_mask(mask, window)`; one
that bounds the tokens a forward may append says so with `max_tokens_per_forward`.
Writes to slots past the capacity are dropped (never wrapped or clamped):
`generate` relies on it so that a prompt's trailing padding takes no slot (its
prefill writes the padded bucket, then truncates each row to its length).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, Self, TypeAlias, runtime_checkable

import jax
from jaxtyping import Array, Float, Int

from efficient.attention.views import DenseView, KVView

if TYPE_CHECKING:
    from efficient.models.config import ModelConfig

__all__ = ["CacheFactory", "DenseView", "KVCache", "KVView", "tree_nbytes"]


@runtime_checkable
class KVCache(Protocol):
    """Structural protocol of a cache layout (dense, paged, quantized, ...)."""

    @property
    def capacity(self) -> int: ...

    @property
    def batch_size(self) -> int: ...

    lengths: Int[Array, " B"]

    def reserve(self, positions: Int[Array, "B T"]) -> tuple[Self, Int[Array, "B T"]]: ...

    def update(
        self, layer: int, k: Float[Array, "B T K H"], v: Float[Array, "B T K H"], slots: Int[Array, "B T"]
    ) -> Self: ...

    def view(self, layer: int, window: int | None = None) -> KVView: ...

    def next_positions(self, num_tokens: int) -> Int[Array, "B T"]: ...

    def truncate(self, lengths: Int[Array, " B"]) -> Self: ...

    def select(self, source_slots: Int[Array, "B C"], counts: Int[Array, " B"], start: Int[Array, " B"]) -> Self: ...

    def nbytes(self) -> int: ...


CacheFactory: TypeAlias = "Callable[[ModelConfig, int, int], KVCache]"
"""`factory(config, batch, capacity) -> KVCache`: what `generate(cache=...)` takes."""


def tree_nbytes(tree: object) -> int:
    """Bytes held by every array leaf of a pytree."""
    return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "nbytes")))
