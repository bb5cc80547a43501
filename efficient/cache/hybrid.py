"""The hybrid cache: a ring buffer for sliding-window layers, a dense cache for global ones.

Gemma 3 interleaves 5 local layers (window 512 or 1024) with 1 global layer; Mistral
windows every layer. A dense cache of capacity S stores every layer at S slots; here
the local layers keep a `RingKVCache` of min(W + max_step - 1, S) entries, so their
memory stays flat as the context grows, and only the global layers grow with S
(Gemma Team 2025, sec. 2: the local:global ratio exists to shrink the KV cache).

Both parts see the same logical slots (`reserve` is identical), so the protocol
(truncate, select, next_positions) is the parts' in lockstep. Layers keep their
global ids: `update(layer, ...)` writes the part the layer belongs to (with a
traced layer index under `lax.scan`, both parts are written and the other
part's write is dropped), and
`view(layer, window)` returns that part's view: `forward` asks for it inside the
layer kind's branch, where the window, and so the view's shape, is static.

    cache = HybridKVCache.for_model(config, batch, capacity)   # or default_cache(...)
"""

from __future__ import annotations

import dataclasses
from typing import Self

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from efficient.cache.dense import DenseKVCache
from efficient.cache.protocol import DenseView, KVCache, tree_nbytes
from efficient.cache.ring import RingKVCache

DEFAULT_MAX_STEP = 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HybridKVCache:
    """`full` holds the global layers (None when every layer is windowed), `ring` the
    windowed ones; `windowed[l]` says which part layer l is in."""

    full: DenseKVCache | None
    ring: RingKVCache
    windowed: tuple[bool, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    @classmethod
    def for_model(cls, config, batch_size: int, capacity: int, dtype=None,  # noqa: ANN001
                  max_step: int = DEFAULT_MAX_STEP) -> HybridKVCache:
        """A hybrid cache for `config`'s sliding-window layers (ValueError if it has none)."""
        windowed = config.windowed_layers()
        if not any(windowed):
            raise ValueError(f"HybridKVCache.for_model: model_type {config.model_type!r} has no sliding-window "
                             "layer; use DenseKVCache (or default_cache)")
        dtype = dtype or config.dtype
        dims = dict(batch_size=batch_size, capacity=capacity, num_kv_heads=config.num_kv_heads,
                    head_dim=config.head_dim, dtype=dtype)
        ring = RingKVCache.init(num_layers=sum(windowed), window=config.sliding_window, max_step=max_step, **dims)
        num_full = len(windowed) - sum(windowed)
        full = DenseKVCache.init(num_layers=num_full, **dims) if num_full else None
        return cls(full=full, ring=ring, windowed=windowed)

    def _parts(self) -> tuple[KVCache, ...]:
        return (self.ring,) if self.full is None else (self.full, self.ring)

    def _part_index(self, layer: int | Int[Array, ""], windowed: bool) -> int | Int[Array, ""]:
        """Layer `layer`'s index within the ring (windowed=True) or the full part; the
        other part's layer count (a dropped write) for a layer of the other kind."""
        ids = np.cumsum([w == windowed for w in self.windowed]) - 1
        other = sum(w == windowed for w in self.windowed)
        table = np.where(np.asarray(self.windowed) == windowed, ids, other).astype(np.int32)
        if isinstance(layer, (int, np.integer)):
            return int(table[int(layer)])
        return jnp.asarray(table)[layer]

    # ----------------------------------------------------------- protocol
    @property
    def lengths(self) -> Int[Array, " B"]:
        return self.ring.lengths

    @property
    def capacity(self) -> int:
        return self.ring.capacity

    @property
    def max_tokens_per_forward(self) -> int:
        return self.ring.max_tokens_per_forward

    @property
    def batch_size(self) -> int:
        return self.ring.batch_size

    @property
    def num_layers(self) -> int:
        return len(self.windowed)

    @property
    def num_kv_heads(self) -> int:
        return self.ring.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.ring.head_dim

    @property
    def dtype(self) -> jnp.dtype:
        return self.ring.dtype

    @property
    def views_differ_by_window(self) -> bool:
        """`forward` reads `view(layer, window)` per layer kind (the views' shapes differ)."""
        return True

    def next_positions(self, num_tokens: int) -> Int[Array, "B T"]:
        return self.ring.next_positions(num_tokens)

    def _map(self, fn) -> Self:  # noqa: ANN001
        return dataclasses.replace(self, full=None if self.full is None else fn(self.full), ring=fn(self.ring))

    def reserve(self, positions: Int[Array, "B T"]) -> tuple[Self, Int[Array, "B T"]]:
        ring, slots = self.ring.reserve(positions)
        full = None if self.full is None else self.full.reserve(positions)[0]
        return dataclasses.replace(self, full=full, ring=ring), slots

    def update(
        self, layer: int | Int[Array, ""], k: Float[Array, "B T K H"], v: Float[Array, "B T K H"],
        slots: Int[Array, "B T"],
    ) -> Self:
        if isinstance(layer, (int, np.integer)):  # a static layer: write only the part that holds it
            if self.windowed[layer]:
                return dataclasses.replace(self, ring=self.ring.update(self._part_index(int(layer), True), k, v, slots))
            return dataclasses.replace(self, full=self.full.update(self._part_index(int(layer), False), k, v, slots))
        # A traced layer writes both parts, the other part at an out-of-range (dropped) index.
        ring = self.ring.update(self._part_index(layer, True), k, v, slots)
        full = None if self.full is None else self.full.update(self._part_index(layer, False), k, v, slots)
        return dataclasses.replace(self, full=full, ring=ring)

    def view(self, layer: int | Int[Array, ""], window: int | None = None) -> DenseView:
        """The view of layer `layer` for a layer kind of sliding window `window` (None: global)."""
        if window is None:
            if self.full is None:
                raise ValueError("HybridKVCache.view: every layer is windowed; window=None has no global part")
            return self.full.view(self._part_index(layer, False))
        return self.ring.view(self._part_index(layer, True), window)

    def view_mask(self, mask: Bool[Array, "B T S"], window: int | None = None) -> Bool[Array, "B T S2"]:
        return mask if window is None else self.ring.view_mask(mask, window)

    def truncate(self, lengths: Int[Array, " B"]) -> Self:
        return self._map(lambda part: part.truncate(lengths))

    def select(self, source_slots: Int[Array, "B C"], counts: Int[Array, " B"], start: Int[Array, " B"]) -> Self:
        return self._map(lambda part: part.select(source_slots, counts, start))

    @property
    def per_layer(self) -> bool:
        """Whether a part holds per-layer buffers (`split_layers`; a layer loop under
        scan needs both stacked)."""
        return any(part.per_layer for part in self._parts())

    def split_layers(self) -> Self:
        """Both parts with per-layer buffers (`LayerStackedKV.split_layers`)."""
        return self._map(lambda part: part.split_layers())

    def stack_layers(self) -> Self:
        """Both parts with stacked arrays (`LayerStackedKV.stack_layers`)."""
        return self._map(lambda part: part.stack_layers())

    def nbytes(self) -> int:
        return tree_nbytes(self)


def default_cache(config, batch_size: int, capacity: int, dtype=None) -> KVCache:  # noqa: ANN001
    """The cache `generate` and `speculative_generate` build when given none: a
    `HybridKVCache` for a model with sliding-window layers whose ring is smaller than
    the capacity, else a `DenseKVCache`."""
    if any(config.windowed_layers()) and config.sliding_window + DEFAULT_MAX_STEP - 1 < capacity:
        return HybridKVCache.for_model(config, batch_size, capacity, dtype)
    return DenseKVCache.for_model(config, batch_size, capacity, dtype)
