"""The dense KV cache: a fixed-capacity buffer per layer, lossless.

Slot `i` of row `b` is the i-th token appended to that row; `lengths[b]` slots
are in use. Rows advance independently (ragged batches, speculative rollback
with a different accepted length per row).

Keys and values are stored [L, B, K, S, H]: one contiguous [S, H] slab per
(layer, row, kv head), the layout the decode kernel reads in place (its view is
a `DenseView` with layout "BKSH" and the row lengths), so a decode step copies
nothing but the new tokens. `split_layers()` stores the same as L per-layer
[B, K, S, H] buffers, for a model whose layers run unrolled on XLA:CPU
(`LayerStackedKV`).
"""

from __future__ import annotations

import dataclasses
from typing import Self

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from efficient.cache.protocol import DenseView, tree_nbytes


def _floating_dtype(dtype: object, caller: str = "DenseKVCache.init") -> jnp.dtype:
    """`dtype` as a jnp dtype; a non-floating one is refused (it would round keys and values)."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{caller}: dtype must be a floating dtype, got {dtype!r}") from e
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"{caller}: dtype must be a floating dtype (float32, bfloat16, ...), got "
                         f"{resolved}: an integer cache would round keys and values")
    return resolved


def _storage_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """16-bit floats are stored as their uint16 bit patterns: XLA:CPU converts a whole
    bf16 buffer to float32 and back around every scatter into it (seen in the compiled
    HLO: 9.6 ms per one-token update of SmolLM2's 30-layer 1024-slot cache, against
    0.0006 ms for float32); on uint16 the scatter is in place."""
    return jnp.dtype(jnp.uint16) if dtype.itemsize == 2 else dtype


def _to_storage(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    x = x.astype(dtype)
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if _storage_dtype(dtype) != dtype else x


def _from_storage(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _rows(batch: int, width: int) -> Int[Array, "B W"]:
    return jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None], (batch, width))


def positive_int(value: object, name: str, caller: str) -> int:
    """`value` if it is a positive int (not a bool), else a ValueError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{caller}: {name} must be a positive int, got {value!r}")
    return value


def positions_after(last: Int[Array, " B"], num_tokens: int) -> Int[Array, "B T"]:
    """The `num_tokens` positions following each row's last one (-1 for an empty row)."""
    return last[:, None] + 1 + jnp.arange(num_tokens, dtype=jnp.int32)[None, :]


class LayerStackedKV:
    """Keys/values of every layer as one stacked [L, B, K, slots, H] array per `k`/`v`, or
    (after `split_layers`) as a tuple of L per-layer [B, K, slots, H] buffers, with a
    static `dtype_name` (the dense and the ring cache).

    Per-layer buffers are for a model whose layers run as a Python loop
    (`set_layer_loop(model, "unrolled")`): XLA:CPU copies a layer's slice out of a
    stacked array before it can feed a dot, so with a stacked cache every decode step
    copied the whole cache once (measured on SmolLM2, batch 1, 256 tokens held: a
    one-token step took 47-52 ms at capacity 4224 against 32 ms at 384; with
    per-layer buffers and blockwise decode attention, 34.5 ms). A model under
    `lax.scan` indexes layers with a traced index and needs the stacked form.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    dtype_name: str

    @property
    def per_layer(self) -> bool:
        """Whether k/v are per-layer buffers (`split_layers`) rather than stacked arrays."""
        return isinstance(self.k, tuple)

    @property
    def _kv_shape(self) -> tuple[int, int, int, int, int]:
        """(L, B, K, slots, H) of either storage."""
        return (len(self.k), *self.k[0].shape) if self.per_layer else tuple(self.k.shape)

    @property
    def batch_size(self) -> int:
        return self._kv_shape[1]

    @property
    def num_layers(self) -> int:
        return self._kv_shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self._kv_shape[2]

    @property
    def head_dim(self) -> int:
        return self._kv_shape[4]

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype of the keys and values (their storage may be bit patterns)."""
        return jnp.dtype(self.dtype_name)

    def _heads(self) -> Int[Array, "1 1 K"]:
        return jnp.arange(self.num_kv_heads, dtype=jnp.int32)[None, None, :]

    def _static_layer(self, layer: int | Int[Array, ""], caller: str) -> int:
        if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) and 0 <= layer < self.num_layers:
            return int(layer)
        raise TypeError(
            f"{type(self).__name__}.{caller}: a cache with per-layer buffers (split_layers) needs a "
            f"Python int layer in [0, {self.num_layers}), got {layer!r}; a model under lax.scan passes "
            f"a traced index: call cache.stack_layers() or set_layer_loop(model, 'unrolled')")

    def _layer_fields(self, names: tuple[str, ...], layer: int | Int[Array, ""]) -> tuple[jax.Array, ...]:
        """One layer of each named layer field (a buffer of its own when per-layer)."""
        if self.per_layer:
            layer = self._static_layer(layer, "view")
        return tuple(getattr(self, name)[layer] for name in names)

    def _write_fields(self, names: tuple[str, ...], layer: int | Int[Array, ""], index: tuple,
                      values: tuple[jax.Array, ...]) -> Self:
        """Scatter `values` at `index` of one layer of each named layer field, in place."""
        if not self.per_layer:
            full = (layer, *index)
            return dataclasses.replace(self, **{name: getattr(self, name).at[full].set(value, mode="drop")
                                                for name, value in zip(names, values, strict=True)})
        layer = self._static_layer(layer, "update")

        def write(name: str, value: jax.Array) -> tuple:
            buffers = list(getattr(self, name))
            buffers[layer] = buffers[layer].at[index].set(value, mode="drop")
            return tuple(buffers)

        return dataclasses.replace(self, **{name: write(name, value) for name, value in zip(names, values, strict=True)})

    def _layer_kv(self, layer: int | Int[Array, ""]) -> tuple[jax.Array, jax.Array]:
        """Stored k/v of one layer, [B, K, slots, H] (a buffer of its own when per-layer)."""
        return self._layer_fields(("k", "v"), layer)

    def _write_layer(self, layer: int | Int[Array, ""], index: tuple, k: jax.Array, v: jax.Array) -> Self:
        """Scatter stored-dtype k/v at `index` (rows, heads, slots) of one layer, in place."""
        return self._write_fields(("k", "v"), layer, index, (k, v))

    def _move_slots(self, index_from: tuple, index_to: tuple) -> tuple:
        """k/v of every layer with the entries at `index_from` (rows, heads, slots) copied to
        `index_to` (dropped where out of range)."""
        def move(x: jax.Array, lead: tuple) -> jax.Array:
            return x.at[(*lead, *index_to)].set(x[(*lead, *index_from)], mode="drop")

        if self.per_layer:
            return tuple(move(x, ()) for x in self.k), tuple(move(x, ()) for x in self.v)
        return move(self.k, (slice(None),)), move(self.v, (slice(None),))  # indexed [L, B, C, K, H]

    def split_layers(self) -> Self:
        """The same cache with per-layer buffers (a copy, so both forms are held until the
        stacked one is freed; for an unrolled layer loop)."""
        if self.per_layer:
            return self
        return dataclasses.replace(self, k=tuple(self.k), v=tuple(self.v))

    def stack_layers(self) -> Self:
        """The same cache with stacked [L, ...] arrays (a copy; for a layer loop under scan)."""
        if not self.per_layer:
            return self
        return dataclasses.replace(self, k=jnp.stack(self.k), v=jnp.stack(self.v))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKVCache(LayerStackedKV):
    """Keys/values [L, B, K, S, H], slot positions [B, S] (-1 empty), lengths [B].

    `k`/`v` hold the values in `dtype_name`, except 16-bit floats, held as their uint16
    bit patterns (see `_storage_dtype`); `view` hands attention the logical dtype.
    """

    k: Float[Array, "L B K S H"] | tuple[Float[Array, "B K S H"], ...]
    v: Float[Array, "L B K S H"] | tuple[Float[Array, "B K S H"], ...]
    positions: Int[Array, "B S"]
    lengths: Int[Array, " B"]
    dtype_name: str = dataclasses.field(default="float32", metadata=dict(static=True))

    @classmethod
    def init(
        cls,
        *,
        num_layers: int,
        batch_size: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: jnp.dtype | str = jnp.float32,
    ) -> DenseKVCache:
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size),
                            ("capacity", capacity), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            positive_int(value, name, "DenseKVCache.init")
        dtype = _floating_dtype(dtype)
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        return cls(
            k=jnp.zeros(shape, _storage_dtype(dtype)),
            v=jnp.zeros(shape, _storage_dtype(dtype)),
            positions=jnp.full((batch_size, capacity), -1, jnp.int32),
            lengths=jnp.zeros((batch_size,), jnp.int32),
            dtype_name=dtype.name,
        )

    @classmethod
    def for_model(cls, config, batch_size: int, capacity: int, dtype=None) -> DenseKVCache:  # noqa: ANN001
        """A cache shaped for `config` (an `efficient.models.ModelConfig`)."""
        return cls.init(
            num_layers=config.num_layers,
            batch_size=batch_size,
            capacity=capacity,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            dtype=dtype or config.dtype,
        )

    # ----------------------------------------------------------- protocol
    @property
    def capacity(self) -> int:
        return self._kv_shape[3]

    def next_positions(self, num_tokens: int) -> Int[Array, "B T"]:
        """Positions following the last one held in each row."""
        return positions_after(jnp.max(self.positions, axis=1), num_tokens)

    def reserve(self, positions: Int[Array, "B T"]) -> tuple[Self, Int[Array, "B T"]]:
        """Take the next T slots of every row for tokens at `positions` (-1: padding).

        The caller sizes the capacity (`forward` checks it outside jit; writes past
        the capacity inside jit would be dropped)."""
        b, t = positions.shape
        slots = self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        new_positions = self.positions.at[_rows(b, t), slots].set(positions.astype(jnp.int32), mode="drop")
        return dataclasses.replace(self, positions=new_positions, lengths=self.lengths + t), slots

    def update(
        self, layer: int, k: Float[Array, "B T K H"], v: Float[Array, "B T K H"], slots: Int[Array, "B T"]
    ) -> Self:
        """Write k/v [B, T, K, H] of layer `layer` (an int, or a traced index when stacked) at `slots`."""
        rows, heads, slots = _rows(*slots.shape)[:, :, None], self._heads(), slots[:, :, None]  # B T K
        return self._write_layer(layer, (rows, heads, slots), _to_storage(k, self.dtype), _to_storage(v, self.dtype))

    def view(self, layer: int | Int[Array, ""], window: int | None = None) -> DenseView:
        """Layer `layer` (an int, or a traced index when stacked) in place ([B, K, S, H]), with the row
        lengths; every slot is kept, so any `window` (the attending layer's) is served."""
        del window
        k, v = self._layer_kv(layer)
        return DenseView(k=_from_storage(k, self.dtype), v=_from_storage(v, self.dtype),
                         positions=self.positions, lengths=self.lengths, layout="BKSH")

    def truncate(self, lengths: Int[Array, " B"]) -> Self:
        """Keep the first `lengths[b]` slots of each row (rollback); never grows a row."""
        lengths = jnp.minimum(jnp.asarray(lengths, jnp.int32), self.lengths)
        keep = jnp.arange(self.capacity, dtype=jnp.int32)[None, :] < lengths[:, None]
        return dataclasses.replace(self, positions=jnp.where(keep, self.positions, -1), lengths=lengths)

    def select(
        self, source_slots: Int[Array, "B C"], counts: Int[Array, " B"], start: Int[Array, " B"]
    ) -> Self:
        """Move `counts[b]` slots `source_slots[b, :counts[b]]` to `start[b] + i`, then
        truncate the row there (compacts an accepted tree path)."""
        b, c = source_slots.shape
        rows = _rows(b, c)
        valid = jnp.arange(c, dtype=jnp.int32)[None, :] < counts[:, None]
        dest = jnp.where(valid, start[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :], self.capacity)
        r3, h3, src3, dst3 = rows[:, :, None], self._heads(), source_slots[:, :, None], dest[:, :, None]
        k, v = self._move_slots((r3, h3, src3), (r3, h3, dst3))
        positions = self.positions.at[rows, dest].set(self.positions[rows, source_slots], mode="drop")
        moved = dataclasses.replace(self, k=k, v=v, positions=positions, lengths=start + c)
        return moved.truncate(start + counts)

    def nbytes(self) -> int:
        return tree_nbytes(self)
