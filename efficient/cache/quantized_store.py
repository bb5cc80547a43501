"""What KIVI, GEAR and VidKV caches share: whole groups of g tokens quantized out of a
full-precision residual ring (Liu et al. 2024's layout).

The most recent tokens stay in full precision in a residual ring of R =
residual_length + g entries; when a forward would overflow it, the oldest whole
groups of g tokens are encoded and move into the packed store. At least
`residual_length` recent tokens are therefore always exact, and a forward of at most
`residual_length` tokens never quantizes its own tokens, so speculative rollback
(`truncate`) and tree commits (`select`) touch the residual only. A longer forward (a
prefill chunk) quantizes its oldest tokens in the same step: its later queries see
them quantized.

Logical slot s of a row is quantized slot s once flushed (the packed store has one
slot per logical slot, capacity rounded up to g) or residual entry s % R before.
A subclass is a registered dataclass with the fields below plus its encoded ones, and
says which of those are per slot [L, B, S, ...] and per group [L, B, S/g, ...]
(`SLOT_FIELDS`, `GROUP_FIELDS`; `CODE_FIELDS` are integers, the rest floats in the
storage dtype); `_encode` turns groups into those fields, `_decode` turns one layer's
group back into keys and values, and `view` builds what attention reads.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Self

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from efficient.cache.dense import _from_storage, _rows, _to_storage, positions_after
from efficient.cache.layer_fields import PerLayerFields
from efficient.cache.protocol import tree_nbytes


def _take(x: jax.Array, index: Int[Array, "B C"]) -> jax.Array:
    """x[b, index[b, c]] along axis 1 of a [B, N, ...] array."""
    return jnp.take_along_axis(x, index.reshape(*index.shape, *([1] * (x.ndim - 2))), axis=1)


def bookkeeping(batch_size: int, capacity: int, ring: int) -> dict[str, jax.Array]:
    """The position and length fields of an empty cache."""
    zeros_b = lambda: jnp.zeros((batch_size,), jnp.int32)  # noqa: E731  (distinct buffers: donated)
    return dict(positions=jnp.full((batch_size, capacity), -1, jnp.int32),
                residual_positions=jnp.full((batch_size, ring), -1, jnp.int32),
                residual_slots=jnp.full((batch_size, ring), -1, jnp.int32),
                lengths=zeros_b(), quantized=zeros_b(), flush_start=zeros_b(), flush_groups=zeros_b(),
                append_start=zeros_b())


def check_sinks(sinks: object, group_size: int, caller: str) -> int:
    if not isinstance(sinks, int) or isinstance(sinks, bool) or not 0 <= sinks <= group_size:
        raise ValueError(f"{caller}: sinks={sinks!r} must be an int in [0, group_size={group_size}]")
    return sinks


def sink_fields(num_layers: int, batch_size: int, sinks: int, num_kv_heads: int, head_dim: int,
                store: jnp.dtype) -> dict[str, jax.Array]:
    """Empty sink_k/sink_v [L, B, n, K, H] (none when sinks is 0)."""
    if not sinks:
        return {}
    return {name: jnp.zeros((num_layers, batch_size, sinks, num_kv_heads, head_dim), store)
            for name in ("sink_k", "sink_v")}


@dataclasses.dataclass(frozen=True)
class GroupQuantizedCache(PerLayerFields):
    """Residual ring plus packed store of whole groups (module docstring). The fields below,
    and in every subclass: k_codes [L, B, S, K, ...] and the other encoded fields.
    residual_k/v [L, B, R, K, H] (or, after
    `split_layers`, every layer field as a tuple of L per-layer buffers); positions of the
    packed slots [B, S] and of the residual entries [B, R] with the logical slot each holds;
    lengths [B] (logical), quantized [B] (slots flushed, a multiple of g, <= lengths);
    `flush_*` / `append_start`: the plan `reserve` made for the layers' `update` of this
    forward. Exact sinks: sink_k/sink_v [L, B, n, K, H] (None when n = `sinks` is 0).
    Static: group_size, residual_length, sinks, dtype_name."""

    residual_k: Float[Array, "L B R K H"]
    residual_v: Float[Array, "L B R K H"]
    positions: Int[Array, "B S"]
    residual_positions: Int[Array, "B R"]
    residual_slots: Int[Array, "B R"]
    lengths: Int[Array, " B"]
    quantized: Int[Array, " B"]
    flush_start: Int[Array, " B"]
    flush_groups: Int[Array, " B"]
    append_start: Int[Array, " B"]
    # Keyword-only, so subclasses declare their encoded (non-default) fields after these.
    sink_k: Float[Array, "L B n K H"] | None = dataclasses.field(default=None, kw_only=True)
    sink_v: Float[Array, "L B n K H"] | None = dataclasses.field(default=None, kw_only=True)
    group_size: int = dataclasses.field(default=32, kw_only=True, metadata=dict(static=True))
    residual_length: int = dataclasses.field(default=32, kw_only=True, metadata=dict(static=True))
    sinks: int = dataclasses.field(default=0, kw_only=True, metadata=dict(static=True))
    dtype_name: str = dataclasses.field(default="float32", kw_only=True, metadata=dict(static=True))

    SLOT_FIELDS: ClassVar[tuple[str, ...]] = ()
    GROUP_FIELDS: ClassVar[tuple[str, ...]] = ()
    CODE_FIELDS: ClassVar[tuple[str, ...]] = ()
    EXTRA_LAYER_FIELDS: ClassVar[tuple[str, ...]] = ("sink_k", "sink_v")  # other [L, ...] fields (None: unused)
    # Per residual entry, moved with it by `select`: [L, B, R, ...] and [B, R, ...] fields.
    RESIDUAL_LAYER_FIELDS: ClassVar[tuple[str, ...]] = ("residual_k", "residual_v")
    RESIDUAL_ROW_FIELDS: ClassVar[tuple[str, ...]] = ("residual_positions",)
    # Per-entry [L, B, R, ...] statistics (among the above) that start at zero whenever an entry
    # takes a token: a new one (`update`) or one moved back from the store (`truncate`).
    RESIDUAL_SCORE_FIELDS: ClassVar[tuple[str, ...]] = ()

    def _encode(self, k: Float[Array, "B F g K H"], v: Float[Array, "B F g K H"]) -> dict[str, jax.Array]:
        """Encoded fields of F groups: per slot [B, F*g, ...], per group [B, F, ...]."""
        raise NotImplementedError

    def _encode_flush(self, layer: int | Int[Array, ""], k: Float[Array, "B F g K H"], v: Float[Array, "B F g K H"],
                      entries: Int[Array, "B Fg"], old: Bool[Array, "B Fg"]) -> dict[str, jax.Array]:
        """Encoded fields of the F groups `update` flushes; `entries`: the residual entry of
        each flushed slot, `old`: whether it was in the residual before this forward (else
        it is one of this forward's tokens). A cache that scores its residual reads it here."""
        del layer, entries, old
        return self._encode(k, v)

    def _decode(self, fields: dict[str, jax.Array]) -> tuple[Float[Array, "B g K H"], Float[Array, "B g K H"]]:
        """Keys and values of one layer's group from its fields (per slot [B, g, ...], per group [B, 1, ...])."""
        raise NotImplementedError

    # Exact sinks: `sinks` = n keeps logical slots 0 .. n-1 exact once flushed (n <= g) in
    # sink_k/sink_v; the view carries them and reads them over the codes. Attention sinks (Xiao et al. 2024) draw
    # a large share of attention, so their quantization error reaches every query.
    def _keep_exact(self, layer: int | Int[Array, ""], k: jax.Array, v: jax.Array,
                    dest: Int[Array, "B C"]) -> dict[str, jax.Array]:
        """The flushed tokens (stored k/v [B, C, K, H] going to logical slots `dest`) of
        slots < sinks, exactly."""
        n = self.sinks
        if not n:
            return {}
        index = (_rows(*dest.shape), jnp.where(dest < n, dest, n))
        return dict(sink_k=self._set("sink_k", layer, index, k), sink_v=self._set("sink_v", layer, index, v))

    def _sink_view(self, layer: int | Int[Array, ""]) -> dict[str, jax.Array]:
        """sink_k/sink_v of one layer for its view (none without sinks)."""
        if not self.sinks:
            return {}
        return {name: _from_storage(self._stored(name, layer), self.dtype) for name in ("sink_k", "sink_v")}

    # ------------------------------------------------------------ layers
    @property
    def layer_fields(self) -> tuple[str, ...]:
        """The fields with a leading layer axis (None fields left out)."""
        names = (*self.SLOT_FIELDS, *self.GROUP_FIELDS, *self.EXTRA_LAYER_FIELDS, "residual_k", "residual_v")
        return tuple(name for name in names if getattr(self, name) is not None)

    # ------------------------------------------------------------ shapes
    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def num_layers(self) -> int:
        return self._layer_shape("residual_k")[0]

    @property
    def num_kv_heads(self) -> int:
        return self._layer_shape("residual_k")[3]

    @property
    def head_dim(self) -> int:
        return self._layer_shape("residual_k")[4]

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype_name)

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]

    @property
    def ring_size(self) -> int:  # R
        return self.residual_positions.shape[1]

    @property
    def max_tokens_per_forward(self) -> int | None:
        """None: any forward size is served (a long one quantizes its own oldest tokens)."""
        return None

    # ----------------------------------------------------------- protocol
    def next_positions(self, num_tokens: int) -> Int[Array, "B T"]:
        slot = jnp.arange(self.capacity, dtype=jnp.int32)[None, :]
        packed = jnp.where(slot < self.quantized[:, None], self.positions, -1)
        last = jnp.maximum(jnp.max(packed, axis=1), jnp.max(self.residual_positions, axis=1))
        return positions_after(last, num_tokens)

    def reserve(self, positions: Int[Array, "B T"]) -> tuple[Self, Int[Array, "B T"]]:
        """Take logical slots lengths[b] + t; plan the flush of the oldest whole groups that
        would not fit the residual ring, and record the positions of the flushed and new slots."""
        b, t = positions.shape
        g, r = self.group_size, self.ring_size
        positions = positions.astype(jnp.int32)
        slots = self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        end = jnp.minimum(self.lengths + t, self.capacity)
        groups = jnp.maximum(0, -(-(end - self.quantized - r) // g))
        flushed_to = self.quantized + groups * g
        # Positions of the flushed slots: from the residual (old slots) or the new tokens.
        span = jnp.arange(-(-t // g) * g, dtype=jnp.int32)[None, :]
        flush_slots = self.quantized[:, None] + span
        from_residual = _take(self.residual_positions, flush_slots % r)
        from_new = _take(positions, jnp.clip(flush_slots - self.lengths[:, None], 0, t - 1))
        flush_pos = jnp.where(flush_slots < self.lengths[:, None], from_residual, from_new)
        dest = jnp.where(flush_slots < flushed_to[:, None], flush_slots, self.capacity)
        packed_positions = self.positions.at[_rows(b, dest.shape[1]), dest].set(flush_pos, mode="drop")
        # The residual keeps slots >= flushed_to: clear the flushed entries, add the new ones.
        keep = self.residual_slots >= flushed_to[:, None]
        res_slots = jnp.where(keep, self.residual_slots, -1)
        res_pos = jnp.where(keep, self.residual_positions, -1)
        entry = jnp.where((slots >= flushed_to[:, None]) & (slots < self.capacity), slots % r, r)
        res_slots = res_slots.at[_rows(b, t), entry].set(slots, mode="drop")
        res_pos = res_pos.at[_rows(b, t), entry].set(positions, mode="drop")
        cache = dataclasses.replace(
            self, positions=packed_positions, residual_positions=res_pos, residual_slots=res_slots,
            lengths=self.lengths + t, quantized=flushed_to, flush_start=self.quantized, flush_groups=groups,
            append_start=self.lengths)
        return cache, slots

    def update(
        self, layer: int | Int[Array, ""], k: Float[Array, "B T K H"], v: Float[Array, "B T K H"],
        slots: Int[Array, "B T"],
    ) -> Self:
        """Quantize the groups `reserve` planned to flush (old residual entries and/or new
        tokens) into the packed store, and write the other new tokens into the residual."""
        b, t = slots.shape
        g, r, cap = self.group_size, self.ring_size, self.capacity
        num_groups = -(-t // g)  # the most groups one forward of t tokens flushes
        dt = self.dtype
        res_k = _from_storage(self._stored("residual_k", layer), dt)
        res_v = _from_storage(self._stored("residual_v", layer), dt)
        # The flushed slots' values, from the residual ring or from this forward's tokens.
        flush_slots = self.flush_start[:, None] + jnp.arange(num_groups * g, dtype=jnp.int32)[None, :]
        old = flush_slots < self.append_start[:, None]
        new_index = jnp.clip(flush_slots - self.append_start[:, None], 0, t - 1)
        pick = lambda res, x: jnp.where(old[:, :, None, None], _take(res, flush_slots % r),  # noqa: E731
                                        _take(x.astype(dt), new_index))
        fk, fv = pick(res_k, k), pick(res_v, v)  # B F*g K H
        kh, h = fk.shape[2:]
        encoded = self._encode_flush(layer, fk.reshape(b, num_groups, g, kh, h), fv.reshape(b, num_groups, g, kh, h),
                                     flush_slots % r, old)
        valid = jnp.arange(num_groups * g, dtype=jnp.int32)[None, :] < (self.flush_groups * g)[:, None]
        dest = jnp.where(valid, flush_slots, cap)
        group_index = self.flush_start[:, None] // g + jnp.arange(num_groups, dtype=jnp.int32)[None, :]
        group_dest = jnp.where(jnp.arange(num_groups)[None, :] < self.flush_groups[:, None], group_index, cap // g)
        rows, grows = _rows(b, dest.shape[1]), _rows(b, num_groups)
        store = lambda x: _to_storage(x, dt)  # noqa: E731
        fields = {}
        for name, x in encoded.items():  # per slot or per group
            stored = x if name in self.CODE_FIELDS else store(x)
            index = (grows, group_dest) if name in self.GROUP_FIELDS else (rows, dest)
            fields[name] = self._set(name, layer, index, stored)
        fields |= self._keep_exact(layer, store(fk), store(fv), dest)
        # New tokens not flushed go to the residual ring (slots past the capacity: dropped).
        flushed_to = self.flush_start + self.flush_groups * g
        entry = jnp.where((slots >= flushed_to[:, None]) & (slots < cap), slots % r, r)
        rows_t = _rows(b, t)
        fields["residual_k"] = self._set("residual_k", layer, (rows_t, entry), store(k))
        fields["residual_v"] = self._set("residual_v", layer, (rows_t, entry), store(v))
        for name in self.RESIDUAL_SCORE_FIELDS:
            fields[name] = self._set(name, layer, (rows_t, entry),
                                     jnp.zeros((b, t, *self._layer_shape(name)[3:]), getattr(self, name)[0].dtype))
        return dataclasses.replace(self, **fields)

    @property
    def views_differ_by_window(self) -> bool:
        return False

    def view_mask(self, mask: Bool[Array, "B T S"], window: int | None = None) -> Bool[Array, "B T S2"]:
        """A mask over logical slots, laid out as the view: packed slots, then the residual
        entries (read at the logical slot each holds)."""
        del window
        held = jnp.broadcast_to(jnp.maximum(self.residual_slots, 0)[:, None, :], (*mask.shape[:2], self.ring_size))
        return jnp.concatenate([mask, jnp.take_along_axis(mask, held, axis=2)], axis=2)

    def truncate(self, lengths: Int[Array, " B"]) -> Self:
        """Keep the first `lengths[b]` logical slots of each row (never grows one). A cut
        inside the packed store moves the partial group before the cut back to the residual
        (dequantized: the tokens stay as lossy as they were)."""
        lengths = jnp.minimum(jnp.asarray(lengths, jnp.int32), self.lengths)
        g, r = self.group_size, self.ring_size
        into_packed = lengths < self.quantized
        quantized = jnp.where(into_packed, lengths // g * g, self.quantized)
        keep = (self.residual_slots >= 0) & (self.residual_slots < lengths[:, None]) & ~into_packed[:, None]
        res_slots = jnp.where(keep, self.residual_slots, -1)
        res_pos = jnp.where(keep, self.residual_positions, -1)
        # Rows cut inside the packed store: slots [quantized, lengths) back into the residual.
        back = quantized[:, None] + jnp.arange(g, dtype=jnp.int32)[None, :]  # B g
        moving = into_packed[:, None] & (back < lengths[:, None])
        entry = jnp.where(moving, back % r, r)
        rows = _rows(self.batch_size, g)
        res_slots = res_slots.at[rows, entry].set(back, mode="drop")
        res_pos = res_pos.at[rows, entry].set(_take(self.positions, jnp.minimum(back, self.capacity - 1)),
                                              mode="drop")
        k, v = self._dequantized_group(quantized)  # L B g K H
        store = lambda x: _to_storage(x, self.dtype)  # noqa: E731
        fields = dict(residual_k=self._set_all_layers("residual_k", (rows, entry), store(k)),
                      residual_v=self._set_all_layers("residual_v", (rows, entry), store(v)))
        for name in self.RESIDUAL_SCORE_FIELDS:
            shape = self._layer_shape(name)
            fields[name] = self._set_all_layers(name, (rows, entry), jnp.zeros((shape[0], *rows.shape, *shape[3:]),
                                                                              getattr(self, name)[0].dtype))
        return dataclasses.replace(self, **fields, residual_positions=res_pos, residual_slots=res_slots,
                                   lengths=lengths, quantized=quantized)

    def _dequantized_group(self, start: Int[Array, " B"]) -> tuple[jax.Array, jax.Array]:
        """Keys/values of the packed group starting at slot `start[b]`, all layers [L, B, g, K, H]."""
        g, dt = self.group_size, self.dtype
        slots = jnp.minimum(start[:, None] + jnp.arange(g, dtype=jnp.int32)[None, :], self.capacity - 1)
        group = jnp.minimum(start // g, self.capacity // g - 1)[:, None]
        fields = {}
        for name in self.SLOT_FIELDS + self.GROUP_FIELDS:
            x = getattr(self, name)
            if x is None:
                continue
            if name not in self.CODE_FIELDS:
                x = tuple(_from_storage(y, dt) for y in x) if isinstance(x, tuple) else _from_storage(x, dt)
            index = group if name in self.GROUP_FIELDS else slots
            fields[name] = (jnp.stack([_take(y, index) for y in x]) if isinstance(x, tuple)
                            else jax.vmap(lambda y, i=index: _take(y, i))(x))  # per layer
        k, v = jax.vmap(self._decode)(fields)
        n = self.sinks
        if n:  # the first group: its sink slots exact
            first = (start == 0)[None, :, None, None, None]
            exact = [_from_storage(jnp.stack(x) if isinstance(x, tuple) else x, dt) for x in (self.sink_k, self.sink_v)]
            k, v = (x.at[:, :, :n].set(jnp.where(first, e.astype(x.dtype), x[:, :, :n])) for x, e in zip((k, v), exact,
                                                                                                     strict=True))
        return k.astype(dt), v.astype(dt)

    def select(
        self, source_slots: Int[Array, "B C"], counts: Int[Array, " B"], start: Int[Array, " B"]
    ) -> Self:
        """Move logical slots `source_slots[b, :counts[b]]` to `start[b] + i`, then truncate
        there (compacts an accepted tree path). Sources and destinations are the last
        forward's tokens, in the residual (a forward of at most `residual_length` tokens)."""
        b, c = source_slots.shape
        r = self.ring_size
        index = jnp.arange(c, dtype=jnp.int32)[None, :]
        dest = start[:, None] + index
        src = source_slots % r
        dst = jnp.where(index < counts[:, None], dest % r, r)
        rows = _rows(b, c)
        move = lambda x, lead: x.at[(*lead, rows, dst)].set(x[(*lead, rows, src)], mode="drop")  # noqa: E731
        fields = {name: self._per_layer_map(name, move) for name in self.RESIDUAL_LAYER_FIELDS}
        fields |= {name: move(getattr(self, name), ()) for name in self.RESIDUAL_ROW_FIELDS}
        res_slots = self.residual_slots.at[rows, dst].set(dest, mode="drop")
        moved = dataclasses.replace(self, **fields, residual_slots=res_slots, lengths=jnp.maximum(self.lengths, start + c))
        return moved.truncate(start + counts)

    def nbytes(self) -> int:
        return tree_nbytes(self)
