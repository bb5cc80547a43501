"""KIVI: a tuning-free 2/4/8-bit KV cache with a full-precision residual (Liu et al. 2024).

Keys are quantized per channel (groups of g consecutive tokens share a scale and
zero per channel: outlier channels keep their own range), values per token
(groups of g channels). The most recent tokens stay in full precision in a
residual ring of R = residual_length + g entries; when a forward would overflow
it, the oldest whole groups of g tokens are quantized and move into the packed
store. At least `residual_length` recent tokens are therefore always exact, and
a forward of at most `residual_length` tokens never quantizes its own tokens, so
speculative rollback (`truncate`) and tree commits (`select`) touch the residual
only. A longer forward (a prefill chunk) quantizes its oldest tokens in the same
step: its later queries see them quantized.

Logical slot s of a row is quantized slot s once flushed (the packed store has one
slot per logical slot, capacity rounded up to g) or residual entry s % R before;
the view is a `QuantizedView` (codes packed along H into uint8, float scales and
zeros, residual), read in place, and `view_mask` maps a mask over logical slots
onto it. `nbytes` is the real memory: packed codes, scales, zeros, residual and
bookkeeping.

GEAR (Kang et al. 2024) is a policy on this layout (`rank=`, `outlier_fraction=`):
when a group is flushed, its entries farthest from the mean are kept exactly, the
rest is quantized, and each (group, head) block's quantization error is kept as a
rank-r factorisation (per-slot coefficients, per-group basis, found by power
iteration); the view carries them and attention applies them block by block.
"""

from __future__ import annotations

import dataclasses
from typing import Self

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, UInt8

from efficient.attention.views import QuantizedView, add_corrections, dequantize
from efficient.cache.dense import (
    _floating_dtype,
    _from_storage,
    _rows,
    _storage_dtype,
    _to_storage,
    positions_after,
    positive_int,
)
from efficient.cache.protocol import tree_nbytes
from efficient.cache.quantize import check_bits, low_rank, quantize_keys, quantize_values, split_outliers

GEAR_FIELDS = tuple(f"{p}_{name}" for p in "kv" for name in ("lowrank_a", "lowrank_b", "outlier_values",
                                                             "outlier_index"))


def _take(x: jax.Array, index: Int[Array, "B C"]) -> jax.Array:
    """x[b, index[b, c]] along axis 1 of a [B, N, ...] array."""
    return jnp.take_along_axis(x, index.reshape(*index.shape, *([1] * (x.ndim - 2))), axis=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KIVICache:
    """Packed codes k/v [L, B, S, K, H*bits/8]; key scale/zero [L, B, S/g, K, H]; value
    scale/zero [L, B, S, K, H/g]; residual k/v [L, B, R, K, H]; positions of the packed
    slots [B, S] and of the residual entries [B, R] with the logical slot each holds;
    lengths [B] (logical), quantized [B] (slots flushed, a multiple of g, <= lengths).
    `flush_*` is the plan `reserve` made for the layers' `update` of this forward."""

    k_codes: UInt8[Array, "L B S K Hp"]
    v_codes: UInt8[Array, "L B S K Hp"]
    k_scale: Float[Array, "L B Sg K H"]
    k_zero: Float[Array, "L B Sg K H"]
    v_scale: Float[Array, "L B S K Hg"]
    v_zero: Float[Array, "L B S K Hg"]
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
    # GEAR (rank > 0 / outliers > 0): per-slot [L, B, S, K, R] and per-group [L, B, S/g, K, R, H]
    # low-rank factors of the quantization error; per-group outliers [L, B, S/g, K, O].
    k_lowrank_a: jax.Array | None = None
    k_lowrank_b: jax.Array | None = None
    k_outlier_values: jax.Array | None = None
    k_outlier_index: jax.Array | None = None
    v_lowrank_a: jax.Array | None = None
    v_lowrank_b: jax.Array | None = None
    v_outlier_values: jax.Array | None = None
    v_outlier_index: jax.Array | None = None
    bits: int = dataclasses.field(default=4, metadata=dict(static=True))
    group_size: int = dataclasses.field(default=32, metadata=dict(static=True))
    residual_length: int = dataclasses.field(default=32, metadata=dict(static=True))
    rank: int = dataclasses.field(default=0, metadata=dict(static=True))
    outliers: int = dataclasses.field(default=0, metadata=dict(static=True))
    dtype_name: str = dataclasses.field(default="float32", metadata=dict(static=True))

    @classmethod
    def init(
        cls, *, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int,
        bits: int = 4, group_size: int = 32, residual_length: int = 32, dtype: jnp.dtype | str = jnp.float32,
        rank: int = 0, outlier_fraction: float = 0.0,
    ) -> KIVICache:
        """capacity: logical slots per row (rounded up to a multiple of `group_size`);
        residual_length: recent tokens always kept in full precision (the residual ring
        holds residual_length + group_size). GEAR (Kang et al. 2024) on top: `rank` > 0
        keeps a rank-`rank` approximation of each group's quantization error and
        `outlier_fraction` > 0 that fraction of each (group, head)'s g * H entries exactly."""
        caller = "KIVICache.init"
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("capacity", capacity),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("group_size", group_size),
                            ("residual_length", residual_length)):
            positive_int(value, name, caller)
        check_bits(bits, caller)
        if head_dim % group_size:
            raise ValueError(f"{caller}: group_size={group_size} must divide head_dim={head_dim} (values are "
                             "quantized in groups of channels)")
        if (head_dim * bits) % 8:
            raise ValueError(f"{caller}: head_dim={head_dim} at bits={bits} does not fill whole bytes")
        capacity = -(-capacity // group_size) * group_size
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= min(group_size, head_dim):
            raise ValueError(f"{caller}: rank={rank!r} must be an int in [0, min(group_size, head_dim)]")
        if not isinstance(outlier_fraction, int | float) or not 0.0 <= outlier_fraction < 0.5:
            raise ValueError(f"{caller}: outlier_fraction={outlier_fraction!r} must be in [0, 0.5)")
        outliers = int(round(outlier_fraction * group_size * head_dim))
        if outlier_fraction > 0 and outliers == 0:
            raise ValueError(f"{caller}: outlier_fraction={outlier_fraction} keeps no entry of a group of "
                             f"{group_size} x {head_dim}")
        if residual_length > capacity:
            raise ValueError(f"{caller}: residual_length={residual_length} is larger than the capacity {capacity}")
        dtype = _floating_dtype(dtype, caller)
        store = _storage_dtype(dtype)
        lb = (num_layers, batch_size)
        ring = residual_length + group_size
        packed = head_dim * bits // 8
        zeros_b = lambda: jnp.zeros((batch_size,), jnp.int32)  # noqa: E731  (distinct buffers: donated)
        return cls(
            k_codes=jnp.zeros((*lb, capacity, num_kv_heads, packed), jnp.uint8),
            v_codes=jnp.zeros((*lb, capacity, num_kv_heads, packed), jnp.uint8),
            k_scale=jnp.zeros((*lb, capacity // group_size, num_kv_heads, head_dim), store),
            k_zero=jnp.zeros((*lb, capacity // group_size, num_kv_heads, head_dim), store),
            v_scale=jnp.zeros((*lb, capacity, num_kv_heads, head_dim // group_size), store),
            v_zero=jnp.zeros((*lb, capacity, num_kv_heads, head_dim // group_size), store),
            residual_k=jnp.zeros((*lb, ring, num_kv_heads, head_dim), store),
            residual_v=jnp.zeros((*lb, ring, num_kv_heads, head_dim), store),
            positions=jnp.full((batch_size, capacity), -1, jnp.int32),
            residual_positions=jnp.full((batch_size, ring), -1, jnp.int32),
            residual_slots=jnp.full((batch_size, ring), -1, jnp.int32),
            lengths=zeros_b(), quantized=zeros_b(), flush_start=zeros_b(), flush_groups=zeros_b(), append_start=zeros_b(),
            bits=bits, group_size=group_size, residual_length=residual_length, dtype_name=dtype.name,
            rank=rank, outliers=outliers, **cls._gear_fields(lb, capacity, num_kv_heads, head_dim, group_size,
                                                              rank, outliers, store),
        )

    @staticmethod
    def _gear_fields(lb: tuple, capacity: int, kh: int, h: int, g: int, rank: int, outliers: int,
                     store: jnp.dtype) -> dict:
        fields: dict = {}
        for p in "kv":
            if rank:
                fields[f"{p}_lowrank_a"] = jnp.zeros((*lb, capacity, kh, rank), store)
                fields[f"{p}_lowrank_b"] = jnp.zeros((*lb, capacity // g, kh, rank, h), store)
            if outliers:
                fields[f"{p}_outlier_values"] = jnp.zeros((*lb, capacity // g, kh, outliers), store)
                fields[f"{p}_outlier_index"] = jnp.zeros((*lb, capacity // g, kh, outliers), jnp.int16)
        return fields

    @classmethod
    def for_model(cls, config, batch_size: int, capacity: int, dtype=None, *, bits: int = 4,  # noqa: ANN001
                  group_size: int = 32, residual_length: int = 32, rank: int = 0,
                  outlier_fraction: float = 0.0) -> KIVICache:
        return cls.init(num_layers=config.num_layers, batch_size=batch_size, capacity=capacity,
                        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, bits=bits,
                        group_size=group_size, residual_length=residual_length, dtype=dtype or config.dtype,
                        rank=rank, outlier_fraction=outlier_fraction)

    # ------------------------------------------------------------ shapes
    @property
    def batch_size(self) -> int:
        return self.k_codes.shape[1]

    @property
    def num_layers(self) -> int:
        return self.k_codes.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k_codes.shape[3]

    @property
    def head_dim(self) -> int:
        return self.residual_k.shape[4]

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype_name)

    @property
    def capacity(self) -> int:
        return self.k_codes.shape[2]

    @property
    def ring_size(self) -> int:  # R
        return self.residual_k.shape[2]

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
        res_k = _from_storage(self.residual_k[layer], dt)
        res_v = _from_storage(self.residual_v[layer], dt)
        # The flushed slots' values, from the residual ring or from this forward's tokens.
        flush_slots = self.flush_start[:, None] + jnp.arange(num_groups * g, dtype=jnp.int32)[None, :]
        old = flush_slots < self.append_start[:, None]
        new_index = jnp.clip(flush_slots - self.append_start[:, None], 0, t - 1)
        pick = lambda res, x: jnp.where(old[:, :, None, None], _take(res, flush_slots % r),  # noqa: E731
                                        _take(x.astype(dt), new_index))
        fk, fv = pick(res_k, k), pick(res_v, v)  # B F*g K H
        kh, h = fk.shape[2:]
        gear: dict[str, jax.Array] = {}
        fk5, fv5 = (x.reshape(b, num_groups, g, kh, h) for x in (fk, fv))
        if self.outliers:
            fk5, gear["k_outlier_values"], gear["k_outlier_index"] = split_outliers(fk5, self.outliers)
            fv5, gear["v_outlier_values"], gear["v_outlier_index"] = split_outliers(fv5, self.outliers)
        kc, ks, kz = quantize_keys(fk5, self.bits)
        vc, vs, vz = quantize_values(fv5.reshape(b, num_groups * g, kh, h), self.bits, g)
        if self.rank:
            q = dict(bits=self.bits, group_size=g)
            k_err = fk5 - dequantize(kc.reshape(b, num_groups * g, kh, -1), ks, kz, axis="channel",
                                     **q).reshape(fk5.shape)
            v_err = fv5 - dequantize(vc, vs, vz, axis="token", **q).reshape(fv5.shape)
            for p, err in (("k", k_err), ("v", v_err)):
                a, bm = low_rank(err, self.rank)
                gear[f"{p}_lowrank_a"], gear[f"{p}_lowrank_b"] = a.reshape(b, num_groups * g, kh, -1), bm
        valid = jnp.arange(num_groups * g, dtype=jnp.int32)[None, :] < (self.flush_groups * g)[:, None]
        dest = jnp.where(valid, flush_slots, cap)
        group_index = self.flush_start[:, None] // g + jnp.arange(num_groups, dtype=jnp.int32)[None, :]
        group_dest = jnp.where(jnp.arange(num_groups)[None, :] < self.flush_groups[:, None], group_index, cap // g)
        rows, grows = _rows(b, dest.shape[1]), _rows(b, num_groups)
        store = lambda x: _to_storage(x, dt)  # noqa: E731
        fields = dict(
            k_codes=self.k_codes.at[layer, rows, dest].set(kc.reshape(b, num_groups * g, *kc.shape[3:]),
                                                           mode="drop"),
            v_codes=self.v_codes.at[layer, rows, dest].set(vc, mode="drop"),
            k_scale=self.k_scale.at[layer, grows, group_dest].set(store(ks), mode="drop"),
            k_zero=self.k_zero.at[layer, grows, group_dest].set(store(kz), mode="drop"),
            v_scale=self.v_scale.at[layer, rows, dest].set(store(vs), mode="drop"),
            v_zero=self.v_zero.at[layer, rows, dest].set(store(vz), mode="drop"),
        )
        for name, x in gear.items():  # per slot (lowrank_a) or per group (the rest)
            stored = x if name.endswith("index") else store(x)
            target = getattr(self, name)
            fields[name] = (target.at[layer, rows, dest].set(stored, mode="drop") if name.endswith("lowrank_a")
                            else target.at[layer, grows, group_dest].set(stored, mode="drop"))
        # New tokens not flushed go to the residual ring (slots past the capacity: dropped).
        flushed_to = self.flush_start + self.flush_groups * g
        entry = jnp.where((slots >= flushed_to[:, None]) & (slots < cap), slots % r, r)
        rows_t = _rows(b, t)
        fields["residual_k"] = self.residual_k.at[layer, rows_t, entry].set(store(k), mode="drop")
        fields["residual_v"] = self.residual_v.at[layer, rows_t, entry].set(store(v), mode="drop")
        return dataclasses.replace(self, **fields)

    def view(self, layer: int | Int[Array, ""], window: int | None = None) -> QuantizedView:
        """Layer `layer`'s packed store and residual, in place (any window)."""
        del window
        dt = self.dtype
        return QuantizedView(
            k_codes=self.k_codes[layer], k_scale=_from_storage(self.k_scale[layer], dt),
            k_zero=_from_storage(self.k_zero[layer], dt), v_codes=self.v_codes[layer],
            v_scale=_from_storage(self.v_scale[layer], dt), v_zero=_from_storage(self.v_zero[layer], dt),
            positions=self.positions, residual_k=_from_storage(self.residual_k[layer], dt),
            residual_v=_from_storage(self.residual_v[layer], dt), residual_positions=self.residual_positions,
            lengths=self.quantized, bits=self.bits, group_size=self.group_size, k_axis="channel", v_axis="token",
            **{name: self._layer(name, layer) for name in GEAR_FIELDS if getattr(self, name) is not None})

    def _layer(self, name: str, layer: int | Int[Array, ""]) -> jax.Array:
        x = getattr(self, name)[layer]
        return x if name.endswith("index") else _from_storage(x, self.dtype)

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
        residual_k = self.residual_k.at[:, rows, entry].set(store(k), mode="drop")
        residual_v = self.residual_v.at[:, rows, entry].set(store(v), mode="drop")
        return dataclasses.replace(self, residual_k=residual_k, residual_v=residual_v, residual_positions=res_pos,
                                   residual_slots=res_slots, lengths=lengths, quantized=quantized)

    def _dequantized_group(self, start: Int[Array, " B"]) -> tuple[jax.Array, jax.Array]:
        """Keys/values of the packed group starting at slot `start[b]`, all layers [L, B, g, K, H]."""
        g, dt = self.group_size, self.dtype
        slots = jnp.minimum(start[:, None] + jnp.arange(g, dtype=jnp.int32)[None, :], self.capacity - 1)
        group = jnp.minimum(start // g, self.capacity // g - 1)[:, None]
        take = lambda x, i: jax.vmap(lambda y: _take(y, i))(x)  # noqa: E731  per layer
        q = dict(bits=self.bits, group_size=g)
        k = jax.vmap(lambda c, s, z: dequantize(c, s, z, axis="channel", **q))(
            take(self.k_codes, slots), take(_from_storage(self.k_scale, dt), group),
            take(_from_storage(self.k_zero, dt), group))
        v = jax.vmap(lambda c, s, z: dequantize(c, s, z, axis="token", **q))(
            take(self.v_codes, slots), take(_from_storage(self.v_scale, dt), slots),
            take(_from_storage(self.v_zero, dt), slots))
        if self.rank or self.outliers:  # GEAR corrections of that group, all layers
            def fields(p: str) -> list:
                out = []
                for name in ("lowrank_a", "lowrank_b", "outlier_values", "outlier_index"):
                    x = getattr(self, f"{p}_{name}")
                    if x is not None:
                        x = x if name.endswith("index") else _from_storage(x, dt)
                        x = take(x, slots if name == "lowrank_a" else group)
                    out.append(x)
                return out
            k = jax.vmap(lambda x, *c: add_corrections(x, g, *c))(k, *fields("k"))
            v = jax.vmap(lambda x, *c: add_corrections(x, g, *c))(v, *fields("v"))
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
        residual_k = self.residual_k.at[:, rows, dst].set(self.residual_k[:, rows, src], mode="drop")
        residual_v = self.residual_v.at[:, rows, dst].set(self.residual_v[:, rows, src], mode="drop")
        res_pos = self.residual_positions.at[rows, dst].set(_take(self.residual_positions, src), mode="drop")
        res_slots = self.residual_slots.at[rows, dst].set(dest, mode="drop")
        moved = dataclasses.replace(self, residual_k=residual_k, residual_v=residual_v,
                                    residual_positions=res_pos, residual_slots=res_slots,
                                    lengths=jnp.maximum(self.lengths, start + c))
        return moved.truncate(start + counts)

    def nbytes(self) -> int:
        return tree_nbytes(self)
