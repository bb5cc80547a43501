"""A KV cache that holds at most a fixed budget of tokens per (layer, KV head), evicting by a press.

Budgets may differ per (layer, KV head) "unit": uniform (H2O, TOVA, SnapKV,
StreamingLLM), decreasing with depth (PyramidKV) or full for retrieval heads and a
sink + window for the others (RazorAttention, DuoAttention); `efficient.cache.budgets`
builds the tables. Storage is ragged, so memory is the sum of the budgets, not the
largest one times the number of units:
- keys and values live in one pool [B, E, H]; unit u = (l, k) owns the region
  [offset_u, offset_u + R_u) with R_u = max_step + budget_u;
- per entry its position, logical slot and score [L, B, K, R] (R = the largest R_u;
  entries past R_u stay empty: a few bytes per entry, against 2 H for the keys and
  values), and per unit the entries in use `held` [L, B, K].
In each unit, entries [0, max_step) hold the last forward's tokens (the same entries in
every unit, so one tree mask serves all) and entries [max_step, R_u) the tokens kept
from earlier forwards, in position order.

Lifecycle of one forward of T <= max_step tokens:
- `reserve` first evicts: every (layer, row, head) keeps its `budget` entries of
  highest priority (the press's sinks and recent window always), compacted in position
  order behind the first max_step entries; the T new tokens then take entries 0..T-1.
  Eviction happens before a forward, on the statistics of committed forwards, so a
  rollback (`truncate`) after a speculative step removes exactly the tokens that step
  appended.
- `update` writes each layer's keys and values at those entries.
- `forward` asks attention for the press's statistics (`key_stats`) and hands them
  to `observe`, which updates the layer's scores: no statistics are computed for a
  press that needs none (StreamingLLM).
Until a unit outgrows its budget nothing is evicted from it and the cache equals the
dense one.

The view is a `DenseView` [B, K, R, H] gathered from the pool, with per-head positions
[B, K, R] (-1 on empty entries), so causal, window and padding masks are exact for
every head (the "xla" and "reference" implementations serve per-head positions; the
kernels decline them).

Keys are cached after RoPE at their original positions, so relative distances stay
those of dense attention after eviction; StreamingLLM's re-indexing of positions
inside the cache (for texts past the trained length) is not done.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Self

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from efficient.attention.spec import KeyStats
from efficient.cache.dense import (
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

Budgets = tuple[tuple[int, ...], ...]  # [L][K]
SORT_ABOVE = 16  # evictions of more entries than this per unit rank by a sort, not by argmin passes


@functools.cache
def _layout(budgets: Budgets, max_step: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Each unit's pool offset and region size [L, K], and the pool's size E."""
    regions = max_step + np.asarray(budgets, np.int64)
    flat = regions.reshape(-1)
    offsets = (np.cumsum(flat) - flat).reshape(regions.shape)
    return offsets.astype(np.int32), regions.astype(np.int32), int(flat.sum())


def budget_table(budget: object, num_layers: int, num_kv_heads: int, capacity: int, press: Press,
                 caller: str) -> Budgets:
    """`budget` (an int for every unit, or an [L, K] table) checked against the press and capacity."""
    if isinstance(budget, int | np.integer) and not isinstance(budget, bool):
        table = np.full((num_layers, num_kv_heads), int(budget))
    else:
        table = np.asarray(budget)
        if table.shape != (num_layers, num_kv_heads) or not np.issubdtype(table.dtype, np.integer):
            raise ValueError(f"{caller}: budget must be an int or an int table [num_layers, num_kv_heads] = "
                             f"[{num_layers}, {num_kv_heads}], got {type(budget).__name__} of shape "
                             f"{getattr(table, 'shape', ())} and dtype {table.dtype}")
    least, most = int(table.min()), int(table.max())
    if least < press.sinks + press.window:
        raise ValueError(f"{caller}: budget {least} is smaller than the press's sinks + window "
                         f"({press.sinks} + {press.window}), which it always keeps")
    if most > capacity:
        raise ValueError(f"{caller}: budget {most} is larger than the capacity {capacity}: "
                         "use the dense cache, which evicts nothing")
    return tuple(tuple(int(b) for b in row) for row in table)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EvictingKVCache:
    """Keys/values in a ragged pool [B, E, H]; per entry its position, logical slot and
    score [L, B, K, R]; `held[l, b, k]` entries in use; `lengths[b]` logical slots
    appended; the last forward's tokens, at entries 0.., start at logical slot `tail_slot[b]`."""

    k: Float[Array, "B E H"]
    v: Float[Array, "B E H"]
    entry_positions: Int[Array, "L B K R"]
    entry_slots: Int[Array, "L B K R"]
    scores: Float[Array, "L B K R"]
    held: Int[Array, "L B K"]
    lengths: Int[Array, " B"]
    tail_slot: Int[Array, " B"]
    press: Press = dataclasses.field(default_factory=Press, metadata=dict(static=True))
    budgets: Budgets = dataclasses.field(default=((1,),), metadata=dict(static=True))
    max_step: int = dataclasses.field(default=1, metadata=dict(static=True))
    logical_capacity: int = dataclasses.field(default=1, metadata=dict(static=True))
    dtype_name: str = dataclasses.field(default="float32", metadata=dict(static=True))

    @classmethod
    def init(
        cls, *, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int,
        press: Press, budget: int | np.ndarray, max_step: int = 1, dtype: jnp.dtype | str = jnp.float32,
    ) -> EvictingKVCache:
        """budget: tokens a (layer, KV head) keeps between forwards, one int for all or an
        int table [num_layers, num_kv_heads] (`efficient.cache.budgets`); max_step: the
        most tokens one forward appends (a decode step 1, a speculative tree its size + 1,
        a prefill chunk its length). capacity: the most tokens a row may be given in all
        (logical; costs no memory)."""
        caller = "EvictingKVCache.init"
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("capacity", capacity),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("max_step", max_step)):
            positive_int(value, name, caller)
        if not isinstance(press, Press):
            raise TypeError(f"{caller}: press must be a Press (StreamingLLMPress, H2OPress, ...), got {press!r}")
        if isinstance(budget, int | np.integer) and not isinstance(budget, bool):
            positive_int(int(budget), "budget", caller)
        budgets = budget_table(budget, num_layers, num_kv_heads, capacity, press, caller)
        dtype = _floating_dtype(dtype, caller)
        _, _, pool = _layout(budgets, max_step)
        shape = (num_layers, batch_size, num_kv_heads, max_step + max(max(row) for row in budgets))

        def empty() -> jax.Array:  # a distinct buffer per field (each is donated)
            return jnp.full(shape, -1, jnp.int32)

        def zeros(*dims: int) -> jax.Array:
            return jnp.zeros(dims, jnp.int32)

        return cls(k=jnp.zeros((batch_size, pool, head_dim), _storage_dtype(dtype)),
                   v=jnp.zeros((batch_size, pool, head_dim), _storage_dtype(dtype)),
                   entry_positions=empty(), entry_slots=empty(), scores=jnp.zeros(shape, jnp.float32),
                   held=zeros(num_layers, batch_size, num_kv_heads), lengths=zeros(batch_size),
                   tail_slot=zeros(batch_size), press=press, budgets=budgets, max_step=max_step,
                   logical_capacity=capacity, dtype_name=dtype.name)

    @classmethod
    def for_model(cls, config, batch_size: int, capacity: int, dtype=None, *, press: Press,  # noqa: ANN001
                  budget: int | np.ndarray, max_step: int = 1) -> EvictingKVCache:
        """A cache shaped for `config` (an `efficient.models.ModelConfig`)."""
        return cls.init(num_layers=config.num_layers, batch_size=batch_size, capacity=capacity,
                        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, press=press,
                        budget=budget, max_step=max_step, dtype=dtype or config.dtype)

    # ----------------------------------------------------------- shapes
    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.budgets)

    @property
    def num_kv_heads(self) -> int:
        return len(self.budgets[0])

    @property
    def head_dim(self) -> int:
        return self.k.shape[2]

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype_name)

    @property
    def num_entries(self) -> int:  # R: the largest unit's region
        return self.entry_positions.shape[3]

    @property
    def budget_table(self) -> np.ndarray:
        """Tokens each (layer, KV head) keeps between forwards [L, K]."""
        return np.asarray(self.budgets, np.int32)

    def _pool_index(self) -> tuple[Int[Array, "L K"], Int[Array, "L K"]]:
        offsets, regions, _ = _layout(self.budgets, self.max_step)
        return jnp.asarray(offsets), jnp.asarray(regions)

    # ----------------------------------------------------------- protocol
    @property
    def capacity(self) -> int:
        return self.logical_capacity

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
        """Keep min(held, budget) entries per (layer, row, head) by priority, compacted in
        position order into entries max_step.. (entries 0..max_step-1 are left empty).

        The held - budget lowest-priority entries are removed one argmin at a time (one
        pass for a decode step): XLA:CPU sorts slowly (an argsort of SmolLM2's [30, 1, 3,
        288] priorities took 5 ms, more than a decode step's attention). Past SORT_ABOVE
        entries (a long prompt compressed at once) one stable sort ranks them instead."""
        positions, held_entry = self.entry_positions, self.entry_slots >= 0
        newest = jnp.max(positions[0, :, 0], axis=1)[None, :, None, None]  # 1 B 1 1
        protected = (positions >= 0) & ((positions < self.press.sinks) | (positions > newest - self.press.window))
        priority = jnp.where(protected, jnp.inf, self.press.priority(self.scores, positions))
        priority = jnp.where(positions >= 0, priority, -jnp.inf)  # padding goes first
        priority = jnp.where(held_entry, priority, jnp.inf)  # an empty entry is not removed
        kept = jnp.minimum(self.held, jnp.asarray(self.budget_table)[:, None, :])  # L B K
        drop = self.held - kept  # L B K
        entries = jnp.arange(self.num_entries, dtype=jnp.int32)

        def remove_lowest(i: jax.Array, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            priority, removed = state
            lowest = jnp.argmin(priority, axis=-1)  # L B K
            hit = (entries == lowest[..., None]) & (i < drop)[..., None]
            return jnp.where(hit, jnp.inf, priority), removed | hit

        def by_argmin(priority: jax.Array) -> jax.Array:
            return jax.lax.fori_loop(0, jnp.max(drop), remove_lowest, (priority, jnp.zeros_like(held_entry)))[1]

        def by_sort(priority: jax.Array) -> jax.Array:  # the same entries (ties: the lowest entry first)
            order = jnp.argsort(priority, axis=-1, stable=True)
            rank = jnp.argsort(order, axis=-1)  # each entry's place in the order
            return rank < drop[..., None]

        # one argmin pass per dropped entry is cheapest for a decode step; a long prefill
        # (thousands over budget) is ranked by one sort instead
        removed = jax.lax.cond(jnp.max(drop) > SORT_ABOVE, by_sort, by_argmin, priority)
        keep = held_entry & ~removed
        # position order: the kept entries from max_step on, then the last forward's (entries 0..)
        in_order = jnp.roll(keep, -self.max_step, axis=-1)
        rank = jnp.roll(jnp.cumsum(in_order, axis=-1) - 1, self.max_step, axis=-1)
        dest = jnp.where(keep, self.max_step + rank, self.num_entries)  # L B K R
        l, b, k = self.num_layers, self.batch_size, self.num_kv_heads
        index = (jnp.arange(l)[:, None, None, None], jnp.arange(b)[None, :, None, None],
                 jnp.arange(k)[None, None, :, None], dest)
        # source entry of each destination (a small int scatter), then gathers: XLA:CPU gathers
        # keys and values 3x faster than it scatters them
        source = jnp.zeros_like(dest).at[index].set(jnp.broadcast_to(entries, dest.shape), mode="drop")
        live = (entries >= self.max_step) & (entries < self.max_step + kept[..., None])  # L B K R

        def move(x: jax.Array, empty: object) -> jax.Array:
            return jnp.where(live, jnp.take_along_axis(x, source, axis=3), jnp.asarray(empty, x.dtype))

        offsets, regions = self._pool_index()
        in_region = entries[None, :] < regions[..., None]  # L K R
        pool_dest = jnp.where(in_region, offsets[..., None] + entries, self.k.shape[1])  # L K R
        pool_source = offsets[:, None, :, None] + source  # L B K R
        pool_from = jnp.zeros((b, self.k.shape[1]), jnp.int32).at[
            jnp.arange(b)[None, :, None, None], pool_dest[:, None]].set(pool_source, mode="drop")  # B E

        def move_pool(x: jax.Array) -> jax.Array:
            return jnp.take_along_axis(x, pool_from[..., None], axis=1)

        return dataclasses.replace(
            self, k=move_pool(self.k), v=move_pool(self.v), entry_positions=move(positions, -1),
            entry_slots=move(self.entry_slots, -1), scores=move(self.scores, 0.0), held=kept)

    def reserve(self, positions: Int[Array, "B T"]) -> tuple[Self, Int[Array, "B T"]]:
        """Evict down to the budgets, then give the T new tokens (logical slots lengths[b] + t)
        entries t in every layer and head; slots past the capacity are dropped."""
        b, t = positions.shape
        cache = self._evict()
        slots = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        entry = jnp.where(slots < self.capacity, jnp.arange(t, dtype=jnp.int32)[None, :], self.num_entries)  # B T
        index = (jnp.arange(self.num_layers)[:, None, None, None], _rows(b, t)[None, :, None, :],
                 jnp.arange(self.num_kv_heads)[None, None, :, None], entry[None, :, None, :])  # L B K T

        def put(x: jax.Array, value: jax.Array) -> jax.Array:
            return x.at[index].set(value[None, :, None, :].astype(x.dtype), mode="drop")

        written = jnp.sum(slots < self.capacity, axis=1).astype(jnp.int32)
        return dataclasses.replace(
            cache, entry_positions=put(cache.entry_positions, positions.astype(jnp.int32)),
            entry_slots=put(cache.entry_slots, slots), scores=put(cache.scores, jnp.zeros((b, t))),
            tail_slot=cache.lengths, held=cache.held + written[None, :, None], lengths=cache.lengths + t), slots

    def _entries(self, slots: Int[Array, "B T"]) -> Int[Array, "B T"]:
        """Entries of logical slots appended by the last forward (R where not held)."""
        entry = slots - self.tail_slot[:, None]
        held = (slots >= self.tail_slot[:, None]) & (slots < self.lengths[:, None]) & (slots < self.capacity)
        return jnp.where(held, entry, self.num_entries)

    def update(self, layer: int | Int[Array, ""], k: Float[Array, "B T K H"], v: Float[Array, "B T K H"],
               slots: Int[Array, "B T"]) -> Self:
        """Write layer `layer`'s keys/values of the tokens `reserve` gave `slots`."""
        offsets, _ = self._pool_index()
        entry = self._entries(slots)[:, :, None]  # B T 1
        where = jnp.where(entry < self.num_entries, offsets[layer][None, None, :] + entry, self.k.shape[1])  # B T K
        index = (_rows(*slots.shape)[:, :, None], where)
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
        """Layer `layer`'s entries gathered from the pool ([B, K, R, H]) with each head's
        positions [B, K, R] (heads keep different tokens; -1 where empty). Any `window` is
        served: attention masks each head by its own positions."""
        del window
        offsets, _ = self._pool_index()
        index = jnp.minimum(offsets[layer][:, None] + jnp.arange(self.num_entries), self.k.shape[1] - 1)  # K R

        def gather(x: jax.Array) -> jax.Array:
            return _from_storage(x[:, index], self.dtype)

        lengths = jnp.full((self.batch_size,), self.num_entries, jnp.int32)
        return DenseView(k=gather(self.k), v=gather(self.v), positions=self.entry_positions[layer],
                         lengths=lengths, layout="BKSH")

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
        return dataclasses.replace(self, entry_positions=jnp.where(keep, self.entry_positions, -1),
                                   entry_slots=jnp.where(keep, self.entry_slots, -1),
                                   scores=jnp.where(keep, self.scores, 0.0),
                                   held=jnp.sum(keep, axis=-1).astype(jnp.int32), lengths=lengths)

    def select(self, source_slots: Int[Array, "B C"], counts: Int[Array, " B"], start: Int[Array, " B"]) -> Self:
        """Move logical slots `source_slots[b, :counts[b]]` (appended by the last forward) to
        `start[b] + i`, then truncate there (compacts an accepted tree path)."""
        b, c = source_slots.shape
        index = jnp.arange(c, dtype=jnp.int32)[None, :]
        dest_slots = start[:, None] + index
        src = jnp.minimum(self._entries(source_slots), self.num_entries - 1)
        dst = jnp.where(index < counts[:, None], dest_slots - self.tail_slot[:, None], self.num_entries)
        r3, s3, d3 = _rows(b, c)[:, :, None], src[:, :, None], dst[:, :, None]
        h3 = jnp.arange(self.num_kv_heads, dtype=jnp.int32)[None, None, :]

        def move(x: jax.Array) -> jax.Array:  # indexed [L, B, C, K, ...]
            return x.at[:, r3, h3, d3].set(x[:, r3, h3, s3], mode="drop")

        offsets, _ = self._pool_index()
        pool_src = offsets[:, None, None, :] + s3[None]  # L B C K
        pool_dst = jnp.where(d3[None] < self.num_entries, offsets[:, None, None, :] + d3[None], self.k.shape[1])

        def move_pool(x: jax.Array) -> jax.Array:
            return x.at[r3[None], pool_dst].set(x[r3[None], pool_src], mode="drop")

        slots = jnp.broadcast_to(dest_slots[None, :, :, None], (self.num_layers, b, c, self.num_kv_heads))
        moved = dataclasses.replace(
            self, k=move_pool(self.k), v=move_pool(self.v), entry_positions=move(self.entry_positions),
            scores=move(self.scores), entry_slots=self.entry_slots.at[:, r3, h3, d3].set(slots, mode="drop"),
            lengths=jnp.maximum(self.lengths, start + c))
        return moved.truncate(start + counts)

    def nbytes(self) -> int:
        return tree_nbytes(self)
