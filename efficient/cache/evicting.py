"""A KV cache that holds at most a fixed budget of tokens per row, evicting by a press.

Storage is [L, B, K, R, H] with R = budget + max_step entries, fixed at init, so
`nbytes` never grows with the context. Each (layer, row, KV head) keeps its own
tokens (H2O, SnapKV and TOVA choose per head): `entry_positions[l, b, k, r]` and
`entry_slots[l, b, k, r]` name the token an entry holds (-1: empty).

Lifecycle of one forward of T <= max_step tokens:
- `reserve` first evicts: every (layer, row, head) keeps its `budget` entries of
  highest priority (the press's sinks and recent window always), compacted to the
  front in their original order; the T new tokens then take entries kept + t,
  the same entries in every layer and head. Eviction happens before a forward,
  on the statistics of committed forwards, so a rollback (`truncate`) after a
  speculative step removes exactly the tokens that step appended.
- `update` writes each layer's keys and values at those entries.
- `forward` asks attention for the press's statistics (`key_stats`) and hands them
  to `observe`, which updates the layer's scores: no statistics are computed for a
  press that needs none (StreamingLLM).
A row holds at most budget + T tokens while a forward runs and budget + max_step
entries of memory; until a row outgrows its budget nothing is evicted and the cache
equals the dense one.

The view is a `DenseView` [B, K, R, H] in place with lengths and per-head positions
[B, K, R], so causal, window and padding masks are exact for every head (the "xla"
and "reference" implementations serve per-head positions; the kernels decline them).

Keys are cached after RoPE at their original positions, so relative distances stay
those of dense attention after eviction; StreamingLLM's re-indexing of positions
inside the cache (for texts past the trained length) is not done.
"""

from __future__ import annotations

import dataclasses
from typing import Self

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from efficient.attention.spec import KeyStats
from efficient.cache.dense import (
    LayerStackedKV,
    _floating_dtype,
    _from_storage,
    _rows,
    _storage_dtype,
    _to_storage,
    positions_after,
    positive_int,
)
from efficient.cache.press import Press
from efficient.cache.protocol import DenseView, tree_nbytes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EvictingKVCache(LayerStackedKV):
    """Keys/values [L, B, K, R, H]; per entry its position, logical slot and score
    [L, B, K, R]; `held[b]` entries in use (the same in every layer and head);
    `lengths[b]` logical slots appended; the last forward's tokens start at entry
    `tail_entry[b]` (logical slot `tail_slot[b]`)."""

    k: Float[Array, "L B K R H"]
    v: Float[Array, "L B K R H"]
    entry_positions: Int[Array, "L B K R"]
    entry_slots: Int[Array, "L B K R"]
    scores: Float[Array, "L B K R"]
    held: Int[Array, " B"]
    lengths: Int[Array, " B"]
    tail_entry: Int[Array, " B"]
    tail_slot: Int[Array, " B"]
    press: Press = dataclasses.field(default_factory=Press, metadata=dict(static=True))
    budget: int = dataclasses.field(default=1, metadata=dict(static=True))
    logical_capacity: int = dataclasses.field(default=1, metadata=dict(static=True))
    dtype_name: str = dataclasses.field(default="float32", metadata=dict(static=True))

    @classmethod
    def init(
        cls, *, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int,
        press: Press, budget: int, max_step: int = 1, dtype: jnp.dtype | str = jnp.float32,
    ) -> EvictingKVCache:
        """budget: tokens a row keeps between forwards; max_step: the most tokens one forward
        appends (a decode step 1, a speculative tree its size + 1, a prefill chunk its length).
        capacity: the most tokens a row may be given in all (logical; costs no memory)."""
        caller = "EvictingKVCache.init"
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("capacity", capacity),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("budget", budget),
                            ("max_step", max_step)):
            positive_int(value, name, caller)
        if not isinstance(press, Press):
            raise TypeError(f"{caller}: press must be a Press (StreamingLLMPress, H2OPress, ...), got {press!r}")
        if budget < press.sinks + press.window:
            raise ValueError(f"{caller}: budget {budget} is smaller than the press's sinks + window "
                             f"({press.sinks} + {press.window}), which it always keeps")
        if budget > capacity:
            raise ValueError(f"{caller}: budget {budget} is larger than the capacity {capacity}: "
                             "use the dense cache, which evicts nothing")
        dtype = _floating_dtype(dtype, caller)
        entries = budget + max_step
        shape = (num_layers, batch_size, num_kv_heads, entries)
        def empty() -> jax.Array:  # a distinct buffer per field (each is donated)
            return jnp.full(shape, -1, jnp.int32)

        def zeros() -> jax.Array:
            return jnp.zeros((batch_size,), jnp.int32)

        return cls(k=jnp.zeros((*shape, head_dim), _storage_dtype(dtype)),
                   v=jnp.zeros((*shape, head_dim), _storage_dtype(dtype)),
                   entry_positions=empty(), entry_slots=empty(), scores=jnp.zeros(shape, jnp.float32),
                   held=zeros(), lengths=zeros(), tail_entry=zeros(), tail_slot=zeros(), press=press, budget=budget,
                   logical_capacity=capacity, dtype_name=dtype.name)

    @classmethod
    def for_model(cls, config, batch_size: int, capacity: int, dtype=None, *, press: Press,  # noqa: ANN001
                  budget: int, max_step: int = 1) -> EvictingKVCache:
        """A cache shaped for `config` (an `efficient.models.ModelConfig`)."""
        return cls.init(num_layers=config.num_layers, batch_size=batch_size, capacity=capacity,
                        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, press=press,
                        budget=budget, max_step=max_step, dtype=dtype or config.dtype)

    # ----------------------------------------------------------- protocol
    @property
    def capacity(self) -> int:
        return self.logical_capacity

    @property
    def num_entries(self) -> int:  # R
        return self.k.shape[3]

    @property
    def max_step(self) -> int:
        return self.num_entries - self.budget

    @property
    def max_tokens_per_forward(self) -> int:
        return self.max_step

    @property
    def max_tokens_per_fresh_forward(self) -> int:
        """A prefill too: every token of a forward must fit before the next eviction."""
        return self.max_step

    @property
    def key_stats(self) -> KeyStats | None:
        """What `forward` asks attention for and passes to `observe`."""
        return self.press.key_stats

    def next_positions(self, num_tokens: int) -> Int[Array, "B T"]:
        """Positions following the newest one held (the press's window always keeps it)."""
        return positions_after(jnp.max(self.entry_positions[0, :, 0], axis=1), num_tokens)

    def _evict(self) -> Self:
        """Keep min(held, budget) entries per (layer, row, head) by priority, compacted in order.

        The held - budget lowest-priority entries are removed one argmin at a time (one
        pass for a decode step): XLA:CPU sorts slowly (an argsort of SmolLM2's [30, 1, 3,
        288] priorities took 5 ms, more than a decode step's attention)."""
        positions, held_entry = self.entry_positions, self.entry_slots >= 0
        newest = jnp.max(positions[0, :, 0], axis=1)[None, :, None, None]  # 1 B 1 1
        protected = (positions >= 0) & ((positions < self.press.sinks) | (positions > newest - self.press.window))
        priority = jnp.where(protected, jnp.inf, self.press.priority(self.scores, positions))
        priority = jnp.where(positions >= 0, priority, -jnp.inf)  # padding goes first
        priority = jnp.where(held_entry, priority, jnp.inf)  # an empty entry is not removed
        kept = jnp.minimum(self.held, self.budget)  # B
        drop = self.held - kept  # B
        entries = jnp.arange(self.num_entries, dtype=jnp.int32)

        def remove_lowest(i: jax.Array, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            priority, removed = state
            lowest = jnp.argmin(priority, axis=-1)  # L B K
            hit = (entries == lowest[..., None]) & (i < drop)[None, :, None, None]
            return jnp.where(hit, jnp.inf, priority), removed | hit

        _, removed = jax.lax.fori_loop(0, jnp.max(drop), remove_lowest, (priority, jnp.zeros_like(held_entry)))
        keep = held_entry & ~removed
        dest = jnp.where(keep, jnp.cumsum(keep, axis=-1) - 1, self.num_entries)  # L B K R
        index = (jnp.arange(self.num_layers)[:, None, None, None], jnp.arange(self.batch_size)[None, :, None, None],
                 jnp.arange(self.num_kv_heads)[None, None, :, None], dest)
        # source entry of each destination (a small int scatter), then gathers: XLA:CPU gathers
        # the [L, B, K, R, H] keys 3x faster than it scatters them
        source = jnp.zeros_like(dest).at[index].set(jnp.broadcast_to(entries, dest.shape), mode="drop")
        live = entries[None, None, None, :] < kept[None, :, None, None]

        def move(x: jax.Array, empty: object) -> jax.Array:
            wide = x.ndim == 5
            moved = jnp.take_along_axis(x, source[..., None] if wide else source, axis=3)
            return jnp.where(live[..., None] if wide else live, moved, jnp.asarray(empty, x.dtype))

        return dataclasses.replace(
            self, k=move(self.k, 0), v=move(self.v, 0), entry_positions=move(positions, -1),
            entry_slots=move(self.entry_slots, -1), scores=move(self.scores, 0.0), held=kept)

    def reserve(self, positions: Int[Array, "B T"]) -> tuple[Self, Int[Array, "B T"]]:
        """Evict down to the budget, then give the T new tokens (logical slots lengths[b] + t)
        entries held[b] + t in every layer and head; slots past the capacity are dropped."""
        b, t = positions.shape
        cache = self._evict()
        slots = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        entry = jnp.where(slots < self.capacity, cache.held[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :],
                          self.num_entries)  # B T
        index = (jnp.arange(self.num_layers)[:, None, None, None], _rows(b, t)[None, :, None, :],
                 jnp.arange(self.num_kv_heads)[None, None, :, None], entry[None, :, None, :])  # L B K T

        def put(x: jax.Array, value: jax.Array) -> jax.Array:
            return x.at[index].set(value[None, :, None, :].astype(x.dtype), mode="drop")

        written = jnp.sum(slots < self.capacity, axis=1).astype(jnp.int32)
        return dataclasses.replace(
            cache, entry_positions=put(cache.entry_positions, positions.astype(jnp.int32)),
            entry_slots=put(cache.entry_slots, slots), scores=put(cache.scores, jnp.zeros((b, t))),
            tail_entry=cache.held, tail_slot=cache.lengths, held=cache.held + written,
            lengths=cache.lengths + t), slots

    def _entries(self, slots: Int[Array, "B T"]) -> Int[Array, "B T"]:
        """Entries of logical slots appended by the last forward (R where not held)."""
        entry = self.tail_entry[:, None] + slots - self.tail_slot[:, None]
        return jnp.where((slots >= self.tail_slot[:, None]) & (entry < self.held[:, None]), entry, self.num_entries)

    def update(self, layer: int | Int[Array, ""], k: Float[Array, "B T K H"], v: Float[Array, "B T K H"],
               slots: Int[Array, "B T"]) -> Self:
        """Write layer `layer`'s keys/values of the tokens `reserve` gave `slots`."""
        index = (layer, _rows(*slots.shape)[:, :, None], self._heads(), self._entries(slots)[:, :, None])
        return dataclasses.replace(self, k=self.k.at[index].set(_to_storage(k, self.dtype), mode="drop"),
                                   v=self.v.at[index].set(_to_storage(v, self.dtype), mode="drop"))

    def observe(self, layer: int | Int[Array, ""], mass: Float[Array, "B K T S"],
                q_positions: Int[Array, "B T"]) -> Self:
        """Fold the attention mass of layer `layer`'s queries into its scores. `mass` is over
        the layer's view (S = R entries), or over the new tokens alone (S = T: a fresh
        prefill, whose tokens sit at entries 0..T-1)."""
        width = mass.shape[-1]
        if width < self.num_entries:
            mass = jnp.pad(mass, ((0, 0), (0, 0), (0, 0), (0, self.num_entries - width)))
        live = self.entry_positions[layer] >= 0
        scores = jnp.where(live, self.press.observe(self.scores[layer], mass, q_positions), 0.0)
        return dataclasses.replace(self, scores=self.scores.at[layer].set(scores))

    def view(self, layer: int | Int[Array, ""], window: int | None = None) -> DenseView:
        """Layer `layer`'s entries in place ([B, K, R, H]) with each head's positions
        [B, K, R] (heads keep different tokens) and the row's entries in use. Any `window`
        is served: attention masks each head by its own positions."""
        del window
        return DenseView(k=_from_storage(self.k[layer], self.dtype), v=_from_storage(self.v[layer], self.dtype),
                         positions=self.entry_positions[layer], lengths=self.held, layout="BKSH")

    def view_mask(self, mask: Bool[Array, "B T S"], window: int | None = None) -> Bool[Array, "B T R"]:
        """A mask over logical slots, read at the slot each entry holds (first head, first
        layer: the new tokens' entries are shared; older ones see what any older slot sees)."""
        del window
        held = jnp.maximum(self.entry_slots[0, :, 0], 0)  # B R
        held = jnp.broadcast_to(held[:, None, :], (*mask.shape[:2], self.num_entries))
        return jnp.take_along_axis(mask, jnp.minimum(held, mask.shape[2] - 1), axis=2)

    def truncate(self, lengths: Int[Array, " B"]) -> Self:
        """Keep logical slots below `lengths[b]` (rollback of the last forward's tokens); never grows a row."""
        lengths = jnp.minimum(jnp.asarray(lengths, jnp.int32), self.lengths)
        keep = (self.entry_slots >= 0) & (self.entry_slots < lengths[None, :, None, None])
        held = jnp.sum(keep[0, :, 0], axis=1).astype(jnp.int32)
        return dataclasses.replace(self, entry_positions=jnp.where(keep, self.entry_positions, -1),
                                   entry_slots=jnp.where(keep, self.entry_slots, -1),
                                   scores=jnp.where(keep, self.scores, 0.0), held=held, lengths=lengths)

    def select(self, source_slots: Int[Array, "B C"], counts: Int[Array, " B"], start: Int[Array, " B"]) -> Self:
        """Move logical slots `source_slots[b, :counts[b]]` (appended by the last forward) to
        `start[b] + i`, then truncate there (compacts an accepted tree path)."""
        b, c = source_slots.shape
        index = jnp.arange(c, dtype=jnp.int32)[None, :]
        dest_slots = start[:, None] + index
        src = self._entries(source_slots)
        dst = self.tail_entry[:, None] + dest_slots - self.tail_slot[:, None]
        dst = jnp.where(index < counts[:, None], dst, self.num_entries)
        r3, s3, d3 = _rows(b, c)[:, :, None], src[:, :, None], dst[:, :, None]
        h3 = self._heads()

        def move(x: jax.Array) -> jax.Array:  # indexed [L, B, C, K, ...]
            return x.at[:, r3, h3, d3].set(x[:, r3, h3, jnp.minimum(s3, self.num_entries - 1)], mode="drop")

        slots = jnp.broadcast_to(dest_slots[None, :, :, None], (self.num_layers, b, c, self.num_kv_heads))
        moved = dataclasses.replace(
            self, k=move(self.k), v=move(self.v), entry_positions=move(self.entry_positions),
            scores=move(self.scores), entry_slots=self.entry_slots.at[:, r3, h3, d3].set(slots, mode="drop"),
            lengths=jnp.maximum(self.lengths, start + c))
        return moved.truncate(start + counts)

    def nbytes(self) -> int:
        return tree_nbytes(self)
