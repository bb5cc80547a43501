"""KIVI: a tuning-free 2/4/8-bit KV cache with a full-precision residual (Liu et al. 2024).

Keys are quantized per channel (groups of g consecutive tokens share a scale and
zero per channel: outlier channels keep their own range), values per token
(groups of g channels). The residual ring, the flush of whole groups and rollback
are `GroupQuantizedCache`'s (efficient/cache/quantized_store.py).

The view is a `QuantizedView` (codes packed along H into uint8, float scales and
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

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt8

from efficient.attention.views import QuantizedView, add_corrections, dequantize
from efficient.cache.dense import _floating_dtype, _from_storage, _storage_dtype, positive_int
from efficient.cache.quantize import check_bits, low_rank, quantize_keys, quantize_values, split_outliers
from efficient.cache.quantized_store import GroupQuantizedCache, bookkeeping, check_sinks, sink_fields

GEAR_FIELDS = tuple(f"{p}_{name}" for p in "kv" for name in ("lowrank_a", "lowrank_b", "outlier_values",
                                                             "outlier_index"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KIVICache(GroupQuantizedCache):
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
    rank: int = dataclasses.field(default=0, metadata=dict(static=True))
    outliers: int = dataclasses.field(default=0, metadata=dict(static=True))

    SLOT_FIELDS = ("k_codes", "v_codes", "v_scale", "v_zero", "k_lowrank_a", "v_lowrank_a")
    GROUP_FIELDS = ("k_scale", "k_zero", *(f"{p}_{n}" for p in "kv" for n in ("lowrank_b", "outlier_values",
                                                                              "outlier_index")))
    CODE_FIELDS = ("k_codes", "v_codes", "k_outlier_index", "v_outlier_index")

    @classmethod
    def init(
        cls, *, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int,
        bits: int = 4, group_size: int = 32, residual_length: int = 32, dtype: jnp.dtype | str = jnp.float32,
        rank: int = 0, outlier_fraction: float = 0.0, sinks: int = 0,
    ) -> KIVICache:
        """capacity: logical slots per row (rounded up to a multiple of `group_size`);
        residual_length: recent tokens always kept in full precision (the residual ring
        holds residual_length + group_size). GEAR (Kang et al. 2024) on top: `rank` > 0
        keeps a rank-`rank` approximation of each group's quantization error and
        `outlier_fraction` > 0 that fraction of each (group, head)'s g * H entries exactly.
        sinks: the first `sinks` logical slots (at most one group) kept exact once flushed
        (attention sinks; `GroupQuantizedCache`)."""
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
        check_sinks(sinks, group_size, caller)
        dtype = _floating_dtype(dtype, caller)
        store = _storage_dtype(dtype)
        lb = (num_layers, batch_size)
        ring = residual_length + group_size
        packed = head_dim * bits // 8
        return cls(
            k_codes=jnp.zeros((*lb, capacity, num_kv_heads, packed), jnp.uint8),
            v_codes=jnp.zeros((*lb, capacity, num_kv_heads, packed), jnp.uint8),
            k_scale=jnp.zeros((*lb, capacity // group_size, num_kv_heads, head_dim), store),
            k_zero=jnp.zeros((*lb, capacity // group_size, num_kv_heads, head_dim), store),
            v_scale=jnp.zeros((*lb, capacity, num_kv_heads, head_dim // group_size), store),
            v_zero=jnp.zeros((*lb, capacity, num_kv_heads, head_dim // group_size), store),
            residual_k=jnp.zeros((*lb, ring, num_kv_heads, head_dim), store),
            residual_v=jnp.zeros((*lb, ring, num_kv_heads, head_dim), store),
            **bookkeeping(batch_size, capacity, ring),
            bits=bits, group_size=group_size, residual_length=residual_length, dtype_name=dtype.name,
            rank=rank, outliers=outliers, **cls._gear_fields(lb, capacity, num_kv_heads, head_dim, group_size,
                                                              rank, outliers, store),
            sinks=sinks, **sink_fields(num_layers, batch_size, sinks, num_kv_heads, head_dim, store),
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
                  outlier_fraction: float = 0.0, sinks: int = 0) -> KIVICache:
        return cls.init(num_layers=config.num_layers, batch_size=batch_size, capacity=capacity,
                        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, bits=bits,
                        group_size=group_size, residual_length=residual_length, dtype=dtype or config.dtype,
                        rank=rank, outlier_fraction=outlier_fraction, sinks=sinks)

    def _encode(self, k: Float[Array, "B F g K H"], v: Float[Array, "B F g K H"]) -> dict[str, jax.Array]:
        """Min-max codes (keys per channel, values per token) and, for GEAR, the outliers
        taken out first and the low-rank factors of what quantization left."""
        b, f, g, kh, h = k.shape
        out: dict[str, jax.Array] = {}
        if self.outliers:
            k, out["k_outlier_values"], out["k_outlier_index"] = split_outliers(k, self.outliers)
            v, out["v_outlier_values"], out["v_outlier_index"] = split_outliers(v, self.outliers)
        kc, ks, kz = quantize_keys(k, self.bits)
        vc, vs, vz = quantize_values(v.reshape(b, f * g, kh, h), self.bits, g)
        if self.rank:
            q = dict(bits=self.bits, group_size=g)
            k_err = k - dequantize(kc.reshape(b, f * g, kh, -1), ks, kz, axis="channel", **q).reshape(k.shape)
            v_err = v - dequantize(vc, vs, vz, axis="token", **q).reshape(v.shape)
            for p, err in (("k", k_err), ("v", v_err)):
                a, bm = low_rank(err, self.rank)
                out[f"{p}_lowrank_a"], out[f"{p}_lowrank_b"] = a.reshape(b, f * g, kh, -1), bm
        return out | dict(k_codes=kc.reshape(b, f * g, *kc.shape[3:]), v_codes=vc, k_scale=ks, k_zero=kz,
                          v_scale=vs, v_zero=vz)

    def _decode(self, fields: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        g = self.group_size
        q = dict(bits=self.bits, group_size=g)
        k = dequantize(fields["k_codes"], fields["k_scale"], fields["k_zero"], axis="channel", **q)
        v = dequantize(fields["v_codes"], fields["v_scale"], fields["v_zero"], axis="token", **q)
        names = ("lowrank_a", "lowrank_b", "outlier_values", "outlier_index")
        if self.rank or self.outliers:  # GEAR corrections of that group
            k = add_corrections(k, g, *(fields.get(f"k_{n}") for n in names))
            v = add_corrections(v, g, *(fields.get(f"v_{n}") for n in names))
        return k, v

    def view(self, layer: int | Int[Array, ""], window: int | None = None) -> QuantizedView:
        """Layer `layer`'s packed store and residual, in place (any window)."""
        del window
        dt = self.dtype
        return QuantizedView(
            k_codes=self._stored("k_codes", layer), k_scale=_from_storage(self._stored("k_scale", layer), dt),
            k_zero=_from_storage(self._stored("k_zero", layer), dt), v_codes=self._stored("v_codes", layer),
            v_scale=_from_storage(self._stored("v_scale", layer), dt), v_zero=_from_storage(self._stored("v_zero", layer), dt),
            positions=self.positions, residual_k=_from_storage(self._stored("residual_k", layer), dt),
            residual_v=_from_storage(self._stored("residual_v", layer), dt), residual_positions=self.residual_positions,
            lengths=self.quantized, bits=self.bits, group_size=self.group_size, k_axis="channel", v_axis="token",
            **{name: self._layer(name, layer) for name in GEAR_FIELDS if getattr(self, name) is not None},
            **self._sink_view(layer))

    def _layer(self, name: str, layer: int | Int[Array, ""]) -> jax.Array:
        x = self._stored(name, layer)
        return x if name.endswith("index") else _from_storage(x, self.dtype)

