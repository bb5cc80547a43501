"""ZipCache: mixed-precision KV quantization by token saliency (He et al. 2024), as a KV cache.

Codes: channel-separable tokenwise quantization of keys and values, the `salient_fraction`
most salient tokens of each group of g at `hi_bits`, the rest at `lo_bits`
(efficient/attention/mixed_precision.py). The residual ring of the most recent tokens, the
flush of whole groups and rollback are `GroupQuantizedCache`'s.

Saliency is ZipCache's normalised attention score: the attention mass a token receives,
summed over the queries that attended it, divided by how many queries could attend it
(the count of later query positions: causal visibility, so a sliding window is not
counted), which removes the lower-triangular bias of accumulated scores toward early
tokens. Per KV head (summed over its query heads).

How it avoids full attention scores: a token is only scored while it waits in the
full-precision residual, so the cache asks attention for the mass of the residual's R
entries alone (`KeyStats(tail=R)`); the xla path computes it from the residual's logits
and the log-sum-exp its block loop already has, and still never dequantizes the whole
cache at once. This stands in for the paper's probe tokens (a 10% subset of queries whose
attention rows are computed explicitly): here every query is a probe, but only for the
residual's keys. A token is scored by at least `residual_length` later queries (or all of
them, when fewer) before it is flushed; a forward may therefore append at most
`residual_length` tokens (`generate` prefills in chunks of that size), so no token is
quantized before it has been scored.

Not built from the paper: re-identifying saliency across the whole prompt at prefill (the
ranking here is within each group of g, so each group keeps the same number of salient
tokens), and its FlashAttention integration.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, UInt8

from efficient.attention.mixed_precision import MixedPrecisionView, dequantize_mixed, mixed_code_bytes, quantize_mixed
from efficient.attention.packing import QUANT_BITS
from efficient.attention.spec import KeyStats
from efficient.cache.dense import _floating_dtype, _from_storage, _storage_dtype, positive_int
from efficient.cache.quantized_store import GroupQuantizedCache, _take, bookkeeping

CODES = ("hi", "lo", "token_scale", "token_zero", "channel_scale")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ZipCache(GroupQuantizedCache):
    """Per k/v: codes `*_hi` [L, B, S/g, n, K, H*hi/8] and `*_lo` [L, B, S/g, g-n, K, H*lo/8]
    (saliency order), token scale/zero [L, B, S, K], channel scale [L, B, S/g, K, H]; `rank`
    [L, B, S/g, K, g]; the residual's saliency statistics: attention mass [L, B, R, K] and the
    count of queries that could attend each entry [L, B, R]; residual and bookkeeping as
    `GroupQuantizedCache`."""

    k_hi: UInt8[Array, "L B Sg n K Hh"]
    k_lo: UInt8[Array, "L B Sg m K Hl"]
    k_token_scale: Float[Array, "L B S K"]
    k_token_zero: Float[Array, "L B S K"]
    k_channel_scale: Float[Array, "L B Sg K H"]
    v_hi: UInt8[Array, "L B Sg n K Hh"]
    v_lo: UInt8[Array, "L B Sg m K Hl"]
    v_token_scale: Float[Array, "L B S K"]
    v_token_zero: Float[Array, "L B S K"]
    v_channel_scale: Float[Array, "L B Sg K H"]
    rank: UInt8[Array, "L B Sg K g"]
    residual_mass: Float[Array, "L B R K"]
    residual_count: Float[Array, "L B R"]
    hi_bits: int = dataclasses.field(default=4, metadata=dict(static=True))
    lo_bits: int = dataclasses.field(default=2, metadata=dict(static=True))
    salient: int = dataclasses.field(default=16, metadata=dict(static=True))
    scored: bool = dataclasses.field(default=True, metadata=dict(static=True))

    SLOT_FIELDS = ("k_token_scale", "k_token_zero", "v_token_scale", "v_token_zero")
    GROUP_FIELDS = ("k_hi", "k_lo", "k_channel_scale", "v_hi", "v_lo", "v_channel_scale", "rank")
    CODE_FIELDS = ("k_hi", "k_lo", "v_hi", "v_lo", "rank")
    EXTRA_LAYER_FIELDS = ("residual_mass", "residual_count")
    RESIDUAL_LAYER_FIELDS = ("residual_k", "residual_v", "residual_mass", "residual_count")
    RESIDUAL_SCORE_FIELDS = ("residual_mass", "residual_count")  # new entries start unscored

    @classmethod
    def init(
        cls, *, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int,
        group_size: int = 32, residual_length: int = 128, salient_fraction: float = 0.5, hi_bits: int = 4,
        lo_bits: int = 2, scored: bool = True, dtype: jnp.dtype | str = jnp.float32,
    ) -> ZipCache:
        """capacity: logical slots per row (rounded up to a multiple of `group_size`, at most
        256); residual_length: recent tokens kept in full precision while they are scored
        (also the most tokens one forward may append); salient_fraction: the share of each
        group's tokens at `hi_bits`, the rest at `lo_bits` (each in 2, 4, 8); scored=False:
        the ablation at equal memory, no attention statistics, each group's first tokens at
        `hi_bits`."""
        caller = "ZipCache.init"
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("capacity", capacity),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("group_size", group_size),
                            ("residual_length", residual_length)):
            positive_int(value, name, caller)
        if group_size > 256:
            raise ValueError(f"{caller}: group_size={group_size} must be at most 256 (ranks are stored as uint8)")
        for name, bits in (("hi_bits", hi_bits), ("lo_bits", lo_bits)):
            if bits not in QUANT_BITS:
                raise ValueError(f"{caller}: {name}={bits!r} must be one of {QUANT_BITS}")
            if head_dim * bits % 8:
                raise ValueError(f"{caller}: head_dim={head_dim} * {name}={bits} must fill whole bytes")
        if not isinstance(salient_fraction, int | float) or isinstance(salient_fraction, bool) \
                or not 0.0 <= salient_fraction <= 1.0:
            raise ValueError(f"{caller}: salient_fraction={salient_fraction!r} must be in [0, 1]")
        if not isinstance(scored, bool):
            raise ValueError(f"{caller}: scored={scored!r} must be a bool")
        salient = int(round(salient_fraction * group_size))
        capacity = -(-capacity // group_size) * group_size
        if residual_length > capacity:
            raise ValueError(f"{caller}: residual_length={residual_length} is larger than the capacity {capacity}")
        dtype = _floating_dtype(dtype, caller)
        store = _storage_dtype(dtype)
        lg = (num_layers, batch_size, capacity // group_size)
        ring = residual_length + group_size

        def codes(p: str) -> dict[str, jax.Array]:
            return {f"{p}_hi": jnp.zeros((*lg, salient, num_kv_heads, mixed_code_bytes(head_dim, hi_bits)), jnp.uint8),
                    f"{p}_lo": jnp.zeros((*lg, group_size - salient, num_kv_heads,
                                          mixed_code_bytes(head_dim, lo_bits)), jnp.uint8),
                    f"{p}_token_scale": jnp.zeros((num_layers, batch_size, capacity, num_kv_heads), store),
                    f"{p}_token_zero": jnp.zeros((num_layers, batch_size, capacity, num_kv_heads), store),
                    f"{p}_channel_scale": jnp.zeros((*lg, num_kv_heads, head_dim), store)}

        return cls(
            **codes("k"), **codes("v"), rank=jnp.zeros((*lg, num_kv_heads, group_size), jnp.uint8),
            residual_mass=jnp.zeros((num_layers, batch_size, ring, num_kv_heads), jnp.float32),
            residual_count=jnp.zeros((num_layers, batch_size, ring), jnp.float32),
            residual_k=jnp.zeros((num_layers, batch_size, ring, num_kv_heads, head_dim), store),
            residual_v=jnp.zeros((num_layers, batch_size, ring, num_kv_heads, head_dim), store),
            **bookkeeping(batch_size, capacity, ring), group_size=group_size, residual_length=residual_length,
            hi_bits=hi_bits, lo_bits=lo_bits, salient=salient, scored=scored, dtype_name=dtype.name,
        )

    @classmethod
    def for_model(cls, config, batch_size: int, capacity: int, dtype=None, *, group_size: int = 32,  # noqa: ANN001
                  residual_length: int = 128, salient_fraction: float = 0.5, hi_bits: int = 4,
                  lo_bits: int = 2, scored: bool = True) -> ZipCache:
        return cls.init(num_layers=config.num_layers, batch_size=batch_size, capacity=capacity,
                        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, group_size=group_size,
                        residual_length=residual_length, salient_fraction=salient_fraction, hi_bits=hi_bits,
                        lo_bits=lo_bits, scored=scored, dtype=dtype or config.dtype)

    # ------------------------------------------------------------ forward size
    @property
    def max_tokens_per_forward(self) -> int:
        """A longer forward would quantize some of its own tokens before they were scored."""
        return self.residual_length

    @property
    def max_tokens_per_fresh_forward(self) -> int:
        return self.residual_length

    # ------------------------------------------------------------ saliency
    @property
    def key_stats(self) -> KeyStats | None:
        """The attention mass of the residual's entries, per KV head: [B, K, R] (None: not scored)."""
        return KeyStats(per_kv_head=True, tail=self.ring_size) if self.scored else None

    def saliency(self, layer: int | Int[Array, ""]) -> Float[Array, "B R K"]:
        """ZipCache's normalised attention score of each residual entry: mass / queries that could attend it."""
        count = self._stored("residual_count", layer)
        return self._stored("residual_mass", layer) / jnp.maximum(count, 1.0)[:, :, None]

    def observe(self, layer: int | Int[Array, ""], mass: Float[Array, "B K R"], q_positions: Int[Array, "B T"]) -> ZipCache:
        """Add the attention mass of layer `layer`'s queries to its residual entries' scores,
        and count the queries that could attend each entry (causally; padding never). `mass`
        [B, K, T] of a fresh forward (attention read its T new tokens only) is over entries
        0 .. T-1, where a fresh cache puts them."""
        if mass.shape[-1] > self.ring_size:
            raise ValueError(f"ZipCache.observe: mass over {mass.shape[-1]} slots, more than the residual's "
                             f"{self.ring_size} entries (key_stats.tail was not applied)")
        if mass.shape[-1] < self.ring_size:
            mass = jnp.pad(mass, ((0, 0), (0, 0), (0, self.ring_size - mass.shape[-1])))
        entry = self.residual_positions[:, :, None]  # B R 1
        queries = q_positions.astype(jnp.int32)[:, None, :]  # B 1 T
        seen = jnp.sum((queries >= 0) & (entry >= 0) & (queries >= entry), axis=2, dtype=jnp.float32)
        mass = self._stored("residual_mass", layer) + jnp.swapaxes(mass, 1, 2)
        count = self._stored("residual_count", layer) + seen
        return dataclasses.replace(self, residual_mass=self._set("residual_mass", layer, (), mass),
                                   residual_count=self._set("residual_count", layer, (), count))

    # ------------------------------------------------------------ codec
    def _encode_flush(self, layer: int | Int[Array, ""], k: Float[Array, "B F g K H"], v: Float[Array, "B F g K H"],
                      entries: Int[Array, "B Fg"], old: Bool[Array, "B Fg"]) -> dict[str, jax.Array]:
        scores = _take(self.saliency(layer), entries)  # B F*g K
        scores = jnp.where(old[:, :, None] & self.scored, scores, 0.0).reshape(*k.shape[:3], k.shape[3])
        return self._encode(k, v, scores)

    def _encode(self, k: Float[Array, "B F g K H"], v: Float[Array, "B F g K H"],
                saliency: Float[Array, "B F g K"] | None = None) -> dict[str, jax.Array]:
        if saliency is None:
            saliency = jnp.zeros(k.shape[:4], jnp.float32)
        bits = dict(salient=self.salient, hi_bits=self.hi_bits, lo_bits=self.lo_bits)
        kc, vc = quantize_mixed(k, saliency, **bits), quantize_mixed(v, saliency, **bits)
        return {f"{p}_{name}": fields[name] for p, fields in (("k", kc), ("v", vc)) for name in CODES} | dict(
            rank=kc["rank"])

    def _decode(self, fields: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        bits = dict(hi_bits=self.hi_bits, lo_bits=self.lo_bits)
        read = lambda p: dequantize_mixed(*(fields[f"{p}_{name}"] for name in CODES[:4]),  # noqa: E731
                                          fields[f"{p}_channel_scale"], fields["rank"], **bits)
        return read("k"), read("v")

    def view(self, layer: int | Int[Array, ""], window: int | None = None) -> MixedPrecisionView:
        """Layer `layer`'s packed store and residual, in place (any window)."""
        del window
        dt = self.dtype
        floats = {f"{p}_{name}": _from_storage(self._stored(f"{p}_{name}", layer), dt)
                  for p in "kv" for name in CODES[2:]}
        codes = {f"{p}_{name}": self._stored(f"{p}_{name}", layer) for p in "kv" for name in CODES[:2]}
        return MixedPrecisionView(
            **codes, **floats, rank=self._stored("rank", layer), positions=self.positions,
            residual_k=_from_storage(self._stored("residual_k", layer), dt),
            residual_v=_from_storage(self._stored("residual_v", layer), dt),
            residual_positions=self.residual_positions, lengths=self.quantized, group_size=self.group_size,
            hi_bits=self.hi_bits, lo_bits=self.lo_bits)
