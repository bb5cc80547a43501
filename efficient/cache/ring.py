"""A ring-buffer KV cache for sliding-window layers: memory flat in context length.

A layer whose queries see only keys with q_pos - k_pos < W (Mistral, Gemma 3's
local layers) never reads more than the last W tokens, so it keeps them in a ring
of R slots: logical slot s (the s-th token appended to a row, as in the dense
cache) lives in ring entry s % R. `ring_slots[b, r]` names the logical slot held
(-1: empty), so rollback (`truncate`) and tree compaction (`select`) stay exact.

Why R = W + max_step - 1 and not W: one forward appends up to T tokens before
attending, and its first query still needs the W - 1 tokens before it; writing T
tokens into a ring of W + T - 1 entries overwrites only logical slots older than
that. Speculative rollback keeps what it needs for the same reason (the accepted
tokens were written by the step that is rolled back, the window before them was
not touched). A forward of more than `max_tokens_per_forward` tokens on a
non-empty cache would lose keys its own queries need, so `forward` refuses it;
a prefill into an empty cache (`forward(..., fresh_cache=True)`) attends its new
tokens directly, and the ring keeps the last R real tokens it wrote.

The stored layout is the dense cache's, [L, B, K, R, H] (or per-layer buffers
after `split_layers()`), and `view` is a
`DenseView` over the R entries with their positions, so every attention
implementation serves it unchanged (attention masks by position).
"""

from __future__ import annotations

import dataclasses
from typing import Self

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

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
from efficient.cache.protocol import DenseView, tree_nbytes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RingKVCache(LayerStackedKV):
    """Keys/values [L, B, K, R, H] for layers of one sliding window W; ring entry r of
    row b holds logical slot `ring_slots[b, r]` at position `ring_positions[b, r]`."""

    k: Float[Array, "L B K R H"] | tuple[Float[Array, "B K R H"], ...]
    v: Float[Array, "L B K R H"] | tuple[Float[Array, "B K R H"], ...]
    ring_positions: Int[Array, "B R"]
    ring_slots: Int[Array, "B R"]
    lengths: Int[Array, " B"]
    window: int = dataclasses.field(default=1, metadata=dict(static=True))
    logical_capacity: int = dataclasses.field(default=1, metadata=dict(static=True))
    dtype_name: str = dataclasses.field(default="float32", metadata=dict(static=True))

    @classmethod
    def init(
        cls, *, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int,
        window: int, max_step: int = 128, dtype: jnp.dtype | str = jnp.float32,
    ) -> RingKVCache:
        """A ring of min(window + max_step - 1, capacity) entries per layer.

        capacity: the most tokens a row may hold (logical slots; costs no memory).
        max_step: the most tokens one forward may append to a non-empty cache (a decode
            step is 1, a speculative verification its tree size + 1, a prefill chunk its
            length)."""
        caller = "RingKVCache.init"
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("capacity", capacity),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("window", window),
                            ("max_step", max_step)):
            positive_int(value, name, caller)
        dtype = _floating_dtype(dtype, caller)
        ring = min(window + max_step - 1, capacity)
        shape = (num_layers, batch_size, num_kv_heads, ring, head_dim)
        return cls(k=jnp.zeros(shape, _storage_dtype(dtype)), v=jnp.zeros(shape, _storage_dtype(dtype)),
                   ring_positions=jnp.full((batch_size, ring), -1, jnp.int32),
                   ring_slots=jnp.full((batch_size, ring), -1, jnp.int32), lengths=jnp.zeros((batch_size,), jnp.int32),
                   window=window, logical_capacity=capacity, dtype_name=dtype.name)

    # ----------------------------------------------------------- protocol
    @property
    def capacity(self) -> int:
        return self.logical_capacity

    @property
    def ring_size(self) -> int:  # R
        return self._kv_shape[3]

    @property
    def max_tokens_per_forward(self) -> int:
        """The most tokens one forward may append to a non-empty cache."""
        return self.ring_size - self.window + 1 if self.ring_size < self.capacity else self.capacity

    def next_positions(self, num_tokens: int) -> Int[Array, "B T"]:
        """Positions following the last one held in each row (the newest token is always in the ring)."""
        return positions_after(jnp.max(self.ring_positions, axis=1), num_tokens)

    def reserve(self, positions: Int[Array, "B T"]) -> tuple[Self, Int[Array, "B T"]]:
        """Take logical slots lengths[b] + t; a real token (position >= 0) below the capacity
        gets ring entry slot % R if it is among the last R real slots of this call."""
        b, t = positions.shape
        slots = self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        real = (positions >= 0) & (slots < self.capacity)
        newest = jnp.max(jnp.where(real, slots, -1), axis=1, keepdims=True)
        entry = jnp.where(real & (slots > newest - self.ring_size), slots % self.ring_size, self.ring_size)
        rows = _rows(b, t)
        ring_positions = self.ring_positions.at[rows, entry].set(positions.astype(jnp.int32), mode="drop")
        ring_slots = self.ring_slots.at[rows, entry].set(slots, mode="drop")
        return dataclasses.replace(self, ring_positions=ring_positions, ring_slots=ring_slots,
                                   lengths=self.lengths + t), slots

    def entries(self, slots: Int[Array, "B T"]) -> Int[Array, "B T"]:
        """The ring entry holding each logical slot, or R where it is not held."""
        entry = slots % self.ring_size
        held = jnp.take_along_axis(self.ring_slots, entry, axis=1)
        return jnp.where(held == slots, entry, self.ring_size)

    def update(
        self, layer: int | Int[Array, ""], k: Float[Array, "B T K H"], v: Float[Array, "B T K H"],
        slots: Int[Array, "B T"],
    ) -> Self:
        """Write layer `layer`'s k/v at the ring entries `reserve` gave `slots` (others dropped)."""
        rows = _rows(*slots.shape)[:, :, None]
        index = (rows, self._heads(), self.entries(slots)[:, :, None])
        return self._write_layer(layer, index, _to_storage(k, self.dtype), _to_storage(v, self.dtype))

    def view(self, layer: int | Int[Array, ""], window: int | None = None) -> DenseView:
        """Layer `layer`'s R entries in place ([B, K, R, H]) with their positions. `window`
        is the attending layer's; a wider (or no) window is refused: the ring lacks its keys."""
        if self.ring_size < self.capacity and (window is None or window > self.window):
            raise ValueError(f"RingKVCache.view: a ring of window {self.window} cannot serve a layer with "
                             f"window {window!r} (it needs keys older than the ring holds)")
        k, v = self._layer_kv(layer)
        return DenseView(k=_from_storage(k, self.dtype), v=_from_storage(v, self.dtype),
                         positions=self.ring_positions, lengths=jnp.minimum(self.lengths, self.ring_size),
                         layout="BKSH")

    def view_mask(self, mask: Bool[Array, "B T S"], window: int | None = None) -> Bool[Array, "B T R"]:
        """A mask over logical slots, read at the slot each ring entry holds."""
        del window
        held = jnp.broadcast_to(jnp.maximum(self.ring_slots, 0)[:, None, :], (*mask.shape[:2], self.ring_size))
        return jnp.take_along_axis(mask, held, axis=2)

    def truncate(self, lengths: Int[Array, " B"]) -> Self:
        """Keep the first `lengths[b]` logical slots of each row; never grows a row."""
        lengths = jnp.minimum(jnp.asarray(lengths, jnp.int32), self.lengths)
        keep = (self.ring_slots >= 0) & (self.ring_slots < lengths[:, None])
        return dataclasses.replace(self, ring_positions=jnp.where(keep, self.ring_positions, -1),
                                   ring_slots=jnp.where(keep, self.ring_slots, -1), lengths=lengths)

    def select(
        self, source_slots: Int[Array, "B C"], counts: Int[Array, " B"], start: Int[Array, " B"]
    ) -> Self:
        """Move logical slots `source_slots[b, :counts[b]]` to `start[b] + i`, then truncate
        there (compacts an accepted tree path; every source was written by the last forward)."""
        b, c = source_slots.shape
        rows = _rows(b, c)
        index = jnp.arange(c, dtype=jnp.int32)[None, :]
        dest = start[:, None] + index
        src = self.entries(source_slots)
        dst = jnp.where(index < counts[:, None], dest % self.ring_size, self.ring_size)
        r3, h3 = rows[:, :, None], self._heads()
        s3, d3 = src[:, :, None], dst[:, :, None]
        k, v = self._move_slots((r3, h3, s3), (r3, h3, d3))
        positions = jnp.take_along_axis(self.ring_positions, jnp.minimum(src, self.ring_size - 1), axis=1)
        ring_positions = self.ring_positions.at[rows, dst].set(positions, mode="drop")
        ring_slots = self.ring_slots.at[rows, dst].set(dest, mode="drop")
        moved = dataclasses.replace(self, k=k, v=v, ring_positions=ring_positions, ring_slots=ring_slots,
                                    lengths=jnp.maximum(self.lengths, start + c))
        return moved.truncate(start + counts)

    def nbytes(self) -> int:
        return tree_nbytes(self)
