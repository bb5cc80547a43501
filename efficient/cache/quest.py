"""The dense cache with Quest's page bounds: decoding reads only the pages a query needs.

Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference". Every token stays in the cache (nothing is evicted, memory is the dense
cache's plus the bounds); per page of P slots the cache keeps the channel-wise min and
max of its keys, and its view (`QuestView`, efficient/attention/page_select.py) lets a
decode or verification step read the `top_pages` pages whose bound is highest for its
queries. Prefill chunks longer than `max_queries` and the layers in `dense_layers` (the
paper's first two) read everything. Beyond the paper, the first `sink_pages` pages (attention
sinks, Xiao et al. 2024) and the `recent_pages` pages before a step's own are always read
(1 and 1 by default; 0 and 0 is the paper's rule): on SmolLM2 at 1/8 of the pages, 8 passkeys
that the dense cache retrieved and the paper's rule missed gave 5 hits with the sink page.

The bounds of a page are recomputed from the stored keys whenever a forward writes into
it (only the pages the written slots touch, for a short forward), so rollback (`truncate`)
and tree commits (`select`) keep them exact.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Self

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from efficient.attention.page_select import QuestView, page_bounds
from efficient.cache.dense import DenseKVCache, _from_storage, positive_int

# A forward writing more slots than this many pages refreshes every page's bounds at once.
FULL_REFRESH_PAGES = 4


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuestKVCache(DenseKVCache):
    """`DenseKVCache` plus page_min/page_max float32 [L, B, K, S/P, H] (or per-layer tuples
    after `split_layers`)."""

    page_min: Float[Array, "L B K Np H"] | tuple[Float[Array, "B K Np H"], ...] = None  # type: ignore[assignment]
    page_max: Float[Array, "L B K Np H"] | tuple[Float[Array, "B K Np H"], ...] = None  # type: ignore[assignment]
    page_size: int = dataclasses.field(default=16, metadata=dict(static=True))
    top_pages: int = dataclasses.field(default=8, metadata=dict(static=True))
    max_queries: int = dataclasses.field(default=16, metadata=dict(static=True))
    sink_pages: int = dataclasses.field(default=1, metadata=dict(static=True))
    recent_pages: int = dataclasses.field(default=1, metadata=dict(static=True))
    per_query_head: bool = dataclasses.field(default=False, metadata=dict(static=True))
    dense_layers: tuple[int, ...] = dataclasses.field(default=(0, 1), metadata=dict(static=True))

    @classmethod
    def init(  # type: ignore[override]
        cls, *, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int,
        dtype: jnp.dtype | str = jnp.float32, page_size: int = 16, top_pages: int = 8, max_queries: int = 16,
        dense_layers: tuple[int, ...] = (0, 1), sink_pages: int = 1, recent_pages: int = 1,
        per_query_head: bool = False,
    ) -> QuestKVCache:
        """sink_pages / recent_pages: the first pages (attention sinks) and the pages just before
        a step's own always read, within `top_pages` (0, 0: the paper's rule; on SmolLM2 at 1/8
        of the pages, 8 passkeys that the paper's rule missed gave 5 hits with the sink page).
        per_query_head: each query head reads its own `top_pages` pages (the paper's per-head
        selection; G times the reads) instead of one selection per KV head."""
        for name, value in (("page_size", page_size), ("top_pages", top_pages), ("max_queries", max_queries)):
            positive_int(value, name, "QuestKVCache.init")
        for name, value in (("sink_pages", sink_pages), ("recent_pages", recent_pages)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"QuestKVCache.init: {name} must be an int >= 0, got {value!r}")
        if capacity % page_size:
            raise ValueError(f"QuestKVCache.init: page_size={page_size} must divide capacity={capacity}")
        if max_queries > page_size:
            raise ValueError(f"QuestKVCache.init: max_queries={max_queries} must be <= page_size={page_size} "
                             "(the pages holding a step's own queries are always read)")
        forced = sink_pages + recent_pages + 2  # a step's own queries span at most 2 pages
        if top_pages < min(forced, capacity // page_size):
            raise ValueError(f"QuestKVCache.init: top_pages={top_pages} must hold the {forced} pages always read "
                             f"(sink_pages={sink_pages} + recent_pages={recent_pages} + 2 of the step's own)")
        dense_layers = tuple(int(i) for i in dense_layers)
        if any(not 0 <= i < num_layers for i in dense_layers):
            raise ValueError(f"QuestKVCache.init: dense_layers={dense_layers} must be layer ids in [0, {num_layers})")
        base = DenseKVCache.init(num_layers=num_layers, batch_size=batch_size, capacity=capacity,
                                 num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
        shape = (num_layers, batch_size, num_kv_heads, capacity // page_size, head_dim)
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(DenseKVCache)},
                   page_min=jnp.zeros(shape, jnp.float32), page_max=jnp.zeros(shape, jnp.float32),
                   page_size=page_size, top_pages=top_pages, max_queries=max_queries, dense_layers=dense_layers,
                   sink_pages=sink_pages, recent_pages=recent_pages, per_query_head=bool(per_query_head))

    @classmethod
    def for_model(cls, config, batch_size: int, capacity: int, dtype=None, *, page_size: int = 16,  # noqa: ANN001
                  page_fraction: float = 0.125, **kwargs: object) -> QuestKVCache:
        """A cache shaped for `config` reading `page_fraction` of its pages per step (at least the
        pages always read), the capacity rounded up to whole pages."""
        if not 0.0 < page_fraction <= 1.0:
            raise ValueError(f"QuestKVCache.for_model: page_fraction must be in (0, 1], got {page_fraction!r}")
        capacity = -(-capacity // page_size) * page_size
        forced = int(kwargs.get("sink_pages", 1)) + int(kwargs.get("recent_pages", 1)) + 2
        top = max(forced, math.ceil(page_fraction * capacity // page_size))
        return cls.init(num_layers=config.num_layers, batch_size=batch_size, capacity=capacity,
                        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=dtype or config.dtype,
                        page_size=page_size, top_pages=min(top, capacity // page_size), **kwargs)

    @classmethod
    def from_dense(cls, dense: DenseKVCache, *, page_size: int = 16, top_pages: int = 8,
                   **settings: object) -> QuestKVCache:
        """The same keys and values with their page bounds: prefill densely, then decode reading
        `top_pages` pages (a copy of the dense cache's arrays; its capacity must be whole pages).
        `settings`: the other keywords of `init` (max_queries, dense_layers, sink_pages, recent_pages)."""
        stacked = dense.stack_layers() if dense.per_layer else dense
        empty = cls.init(num_layers=dense.num_layers, batch_size=dense.batch_size, capacity=dense.capacity,
                         num_kv_heads=dense.num_kv_heads, head_dim=dense.head_dim, dtype=dense.dtype,
                         page_size=page_size, top_pages=top_pages, **settings)
        cache = dataclasses.replace(empty, **{f.name: jnp.copy(getattr(stacked, f.name))
                                              for f in dataclasses.fields(DenseKVCache) if f.name != "dtype_name"})
        if dense.per_layer:
            cache = cache.split_layers()
        for layer in range(cache.num_layers):
            cache = cache._refresh(layer, jnp.zeros((cache.batch_size,), jnp.int32), cache.capacity)
        return cache

    # ----------------------------------------------------------- layer storage
    def split_layers(self) -> Self:
        if self.per_layer:
            return self
        return dataclasses.replace(super().split_layers(), page_min=tuple(self.page_min),
                                   page_max=tuple(self.page_max))

    def stack_layers(self) -> Self:
        if not self.per_layer:
            return self
        return dataclasses.replace(super().stack_layers(), page_min=jnp.stack(self.page_min),
                                   page_max=jnp.stack(self.page_max))

    def _bounds(self, layer: int | Int[Array, ""]) -> tuple[jax.Array, jax.Array]:
        return self._layer_fields(("page_min", "page_max"), layer)

    def _set_bounds(self, layer: int | Int[Array, ""], index: tuple, lo: jax.Array, hi: jax.Array) -> Self:
        return self._write_fields(("page_min", "page_max"), layer, index, (lo, hi))

    # ----------------------------------------------------------- bounds
    def _live(self) -> jax.Array:  # B S
        return (self.positions >= 0) & (jnp.arange(self.capacity, dtype=jnp.int32)[None, :] < self.lengths[:, None])

    def _refresh(self, layer: int | Int[Array, ""], first_slot: Int[Array, " B"], num_slots: int) -> Self:
        """Recompute the bounds of the pages holding slots [first_slot, first_slot + num_slots)
        of one layer (every page when that is more than FULL_REFRESH_PAGES pages)."""
        k, _ = self._layer_kv(layer)
        k = _from_storage(k, self.dtype)
        p, n_pages = self.page_size, self.capacity // self.page_size
        touched = min(n_pages, num_slots // p + 2)
        if touched > FULL_REFRESH_PAGES:
            lo, hi = page_bounds(k, self._live(), p)
            return self._set_bounds(layer, (slice(None),), lo, hi)
        b, kh, _, h = k.shape
        pages = jnp.clip(first_slot[:, None] // p + jnp.arange(touched, dtype=jnp.int32)[None, :], 0, n_pages - 1)
        slot = pages[:, :, None] * p + jnp.arange(p, dtype=jnp.int32)  # B n P
        keys = jnp.take_along_axis(k, slot.reshape(b, 1, touched * p, 1), axis=2)  # B K n*P H
        live = jnp.take_along_axis(self._live(), slot.reshape(b, touched * p), axis=1)
        lo, hi = page_bounds(keys, live, p)  # B K n H
        rows = jnp.arange(b, dtype=jnp.int32)[:, None, None]
        heads = jnp.arange(kh, dtype=jnp.int32)[None, :, None]
        return self._set_bounds(layer, (rows, heads, pages[:, None, :]), lo, hi)

    # ----------------------------------------------------------- protocol
    def update(self, layer: int, k: Float[Array, "B T K H"], v: Float[Array, "B T K H"],
               slots: Int[Array, "B T"]) -> Self:
        written = super().update(layer, k, v, slots)
        return written._refresh(layer, jnp.min(jnp.clip(slots, 0, self.capacity - 1), axis=1), slots.shape[1])

    def view(self, layer: int | Int[Array, ""], window: int | None = None) -> QuestView:
        dense = super().view(layer, window)
        lo, hi = self._bounds(layer)
        if isinstance(layer, int | np.integer):
            sparse = int(layer) not in self.dense_layers
        else:
            sparse = ~jnp.any(layer == jnp.asarray(self.dense_layers or (-1,), jnp.int32))
        return QuestView(k=dense.k, v=dense.v, positions=dense.positions, lengths=dense.lengths, page_min=lo,
                         page_max=hi, sparse=sparse, page_size=self.page_size, top_pages=self.top_pages,
                         max_queries=self.max_queries, sink_pages=self.sink_pages,
                         recent_pages=self.recent_pages, per_query_head=self.per_query_head)

    def select(self, source_slots: Int[Array, "B C"], counts: Int[Array, " B"], start: Int[Array, " B"]) -> Self:
        moved = super().select(source_slots, counts, start)
        for layer in range(self.num_layers):
            moved = moved._refresh(layer, start, source_slots.shape[1])
        return moved
