"""VidKV: 1.x-bit keys and 1.58-bit values (Tao et al. 2025), on text, as a KV cache.

Keys: per (group of g tokens, KV head), the `anomalous_fraction` of channels with the widest
range get 2-bit min-max codes per channel; the others are moved to the frequency domain by an
orthonormal real DFT along the channels (`fft=True`, VidKV's FFT) and stored as 1-bit signs
with one scale per coefficient. Values: ternary codes per channel (five per byte). The codec
and what attention reads are in efficient/attention/lowbit.py; the residual ring of the most
recent tokens, the flush of whole groups and rollback are `GroupQuantizedCache`'s.

With anomalous_fraction 0.5 the codes take 1.5 bits per key and 1.6 per value entry; one
scale per channel and group of g = 32 tokens (cache dtype) adds 1 bit (float32) or 0.5 bit
(bfloat16) per key and per value entry, the anomalous channels' zeros half that again per
key entry, and the packed channel mask 1/g bit. `nbytes` counts all of it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt8

from efficient.attention.lowbit import (
    LowBitView,
    dequantize_keys_lowbit,
    dequantize_values_ternary,
    lowbit_key_bytes,
    quantize_keys_lowbit,
    quantize_values_ternary,
    trit_bytes,
)
from efficient.cache.dense import _floating_dtype, _from_storage, _storage_dtype, positive_int
from efficient.cache.quantized_store import GroupQuantizedCache, bookkeeping, check_sinks, sink_fields


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VidKVCache(GroupQuantizedCache):
    """Key codes [L, B, S, K, ceil((H + A)/8)], key scale [L, B, S/g, K, H] (sorted layout:
    anomalous channels, then DFT coefficients), key zero [L, B, S/g, K, A], key channel mask
    [L, B, S/g, K, ceil(H/8)]; value trits [L, B, S, K, ceil(H/5)], value scale [L, B, S/g, K, H];
    residual and bookkeeping as `GroupQuantizedCache`."""

    k_codes: UInt8[Array, "L B S K Hk"]
    k_scale: Float[Array, "L B Sg K H"]
    k_zero: Float[Array, "L B Sg K A"]
    k_mask: UInt8[Array, "L B Sg K H8"]
    v_codes: UInt8[Array, "L B S K Ht"]
    v_scale: Float[Array, "L B Sg K H"]
    anomalous: int = dataclasses.field(default=0, metadata=dict(static=True))
    fft: bool = dataclasses.field(default=True, metadata=dict(static=True))

    SLOT_FIELDS = ("k_codes", "v_codes")
    GROUP_FIELDS = ("k_scale", "k_zero", "k_mask", "v_scale")
    CODE_FIELDS = ("k_codes", "v_codes", "k_mask")

    @classmethod
    def init(
        cls, *, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int,
        group_size: int = 32, residual_length: int = 128, anomalous_fraction: float = 0.5, fft: bool = True,
        sinks: int = 0, dtype: jnp.dtype | str = jnp.float32,
    ) -> VidKVCache:
        """capacity: logical slots per row (rounded up to a multiple of `group_size`);
        residual_length: recent tokens always in full precision; anomalous_fraction: the share
        of each group's key channels (widest range) kept at 2 bits, the rest at 1 bit; sinks:
        the first `sinks` logical slots (at most one group) also kept exactly once flushed,
        text's stand-in for VidKV's protected salient tokens (attention sinks, Xiao et al. 2024)."""
        caller = "VidKVCache.init"
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("capacity", capacity),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("group_size", group_size),
                            ("residual_length", residual_length)):
            positive_int(value, name, caller)
        if not isinstance(anomalous_fraction, int | float) or not 0.0 <= anomalous_fraction <= 1.0:
            raise ValueError(f"{caller}: anomalous_fraction={anomalous_fraction!r} must be in [0, 1]")
        anomalous = int(round(anomalous_fraction * head_dim))
        if not isinstance(fft, bool):
            raise ValueError(f"{caller}: fft={fft!r} must be a bool")
        check_sinks(sinks, group_size, caller)
        capacity = -(-capacity // group_size) * group_size
        if residual_length > capacity:
            raise ValueError(f"{caller}: residual_length={residual_length} is larger than the capacity {capacity}")
        dtype = _floating_dtype(dtype, caller)
        store = _storage_dtype(dtype)
        lbs, lbg = (num_layers, batch_size, capacity, num_kv_heads), (num_layers, batch_size,
                                                                       capacity // group_size, num_kv_heads)
        ring = residual_length + group_size
        return cls(
            k_codes=jnp.zeros((*lbs, lowbit_key_bytes(head_dim, anomalous)), jnp.uint8),
            k_scale=jnp.zeros((*lbg, head_dim), store), k_zero=jnp.zeros((*lbg, anomalous), store),
            k_mask=jnp.zeros((*lbg, -(-head_dim // 8)), jnp.uint8),
            v_codes=jnp.zeros((*lbs, trit_bytes(head_dim)), jnp.uint8), v_scale=jnp.zeros((*lbg, head_dim), store),
            residual_k=jnp.zeros((num_layers, batch_size, ring, num_kv_heads, head_dim), store),
            residual_v=jnp.zeros((num_layers, batch_size, ring, num_kv_heads, head_dim), store),
            **bookkeeping(batch_size, capacity, ring), group_size=group_size, residual_length=residual_length,
            anomalous=anomalous, fft=fft, dtype_name=dtype.name, sinks=sinks,
            **sink_fields(num_layers, batch_size, sinks, num_kv_heads, head_dim, store),
        )

    @classmethod
    def for_model(cls, config, batch_size: int, capacity: int, dtype=None, *, group_size: int = 32,  # noqa: ANN001
                  residual_length: int = 128, anomalous_fraction: float = 0.5, fft: bool = True,
                  sinks: int = 0) -> VidKVCache:
        return cls.init(num_layers=config.num_layers, batch_size=batch_size, capacity=capacity,
                        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, group_size=group_size,
                        residual_length=residual_length, anomalous_fraction=anomalous_fraction, fft=fft,
                        sinks=sinks, dtype=dtype or config.dtype)

    def _encode(self, k: Float[Array, "B F g K H"], v: Float[Array, "B F g K H"]) -> dict[str, jax.Array]:
        return quantize_keys_lowbit(k, self.anomalous, self.fft) | quantize_values_ternary(v)

    def _decode(self, fields: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        g = self.group_size
        k = dequantize_keys_lowbit(fields["k_codes"], fields["k_scale"], fields["k_zero"], fields["k_mask"],
                                   group_size=g, anomalous=self.anomalous, fft=self.fft)
        return k, dequantize_values_ternary(fields["v_codes"], fields["v_scale"], group_size=g)

    def view(self, layer: int | Int[Array, ""], window: int | None = None) -> LowBitView:
        """Layer `layer`'s packed store and residual, in place (any window)."""
        del window
        dt = self.dtype
        return LowBitView(
            k_codes=self._stored("k_codes", layer), k_scale=_from_storage(self._stored("k_scale", layer), dt),
            k_zero=_from_storage(self._stored("k_zero", layer), dt), k_mask=self._stored("k_mask", layer), v_codes=self._stored("v_codes", layer),
            v_scale=_from_storage(self._stored("v_scale", layer), dt), positions=self.positions,
            residual_k=_from_storage(self._stored("residual_k", layer), dt), residual_v=_from_storage(self._stored("residual_v", layer), dt),
            residual_positions=self.residual_positions, lengths=self.quantized, group_size=self.group_size,
            anomalous=self.anomalous, fft=self.fft, **self._sink_view(layer))
