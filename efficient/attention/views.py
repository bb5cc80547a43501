"""What attention reads: typed views of keys and values, as the cache stores them.

A view is a registered pytree. The dispatcher hands it to the implementations
that declare (efficient/attention/capabilities.py) they serve its type, so a
cache is read in place (a paged view through its page table, a quantized view
from its codes) and never copied into a dense float array by the cache.

Slot semantics shared by every view: logical slot s of row b holds the token at
`positions[b, s]` (-1: empty); when `lengths` is given, every slot
s >= lengths[b] is empty for row b and its contents are undefined (an
implementation may skip reading it, and must not let it change the result).

- `DenseView`: k/v [B, S, K, H] (layout "BSKH") or [B, K, S, H] (layout "BKSH",
  what the decode kernel reads: one contiguous [S, H] slab per (row, kv head)).
- `PagedView`: a pool of M pages of P slots [M, P, K, H] and a page table
  [B, R] (vLLM's PagedAttention, Kwon et al. 2023); logical slot s of row b is
  slot s % P of page page_table[b, s // P]; positions are per pool slot [M, P].
- `QuantizedView`: b-bit integer codes packed along H into uint8, dequantized as
  codes * scale + zero per group (KIVI, Liu et al. 2024: keys per channel with
  groups along the tokens, values per token with groups along the channels),
  plus a full-precision residual window of the most recent tokens.
- `LowBitView` (efficient/attention/lowbit.py): VidKV's 1.x-bit keys (2-bit anomalous
  channels, 1-bit real-DFT coefficients of the others) and ternary values, with the same
  residual window.
- `MixedPrecisionView` (efficient/attention/mixed_precision.py): ZipCache's
  channel-separable tokenwise codes, salient tokens at more bits than the others, with
  the same residual window.
- `QuestView` (efficient/attention/page_select.py): a dense [B, K, S, H] view plus per-page
  key bounds; attention reads only the pages whose bound is highest for the query (Quest).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt8

from efficient.attention.lowbit import LowBitView
from efficient.attention.mixed_precision import MixedPrecisionView
from efficient.attention.page_select import QuestView
from efficient.attention.packing import QUANT_BITS, pack_codes, unpack_codes  # noqa: F401  (re-exported)
from efficient.attention.store_view import ResidualStoreView

LAYOUTS = ("BSKH", "BKSH")
QUANT_AXES = ("channel", "token")


def _static(default: object = dataclasses.MISSING) -> dataclasses.Field:
    return dataclasses.field(default=default, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseView:
    """Keys and values in `layout` ([B, S, K, H] or [B, K, S, H]), slot positions [B, S]
    (or [B, K, S] when each KV head holds its own tokens: an evicting cache; served by
    "xla" and "reference") and optional row lengths [B]."""

    k: Float[Array, "B S K H"] | Float[Array, "B K S H"]
    v: Float[Array, "B S K H"] | Float[Array, "B K S H"]
    positions: Int[Array, "B S"] | Int[Array, "B K S"] | None = None
    lengths: Int[Array, " B"] | None = None
    layout: str = _static("BSKH")

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"DenseView.layout must be one of {LAYOUTS}, got {self.layout!r}")

    def _axis(self, letter: str) -> int:
        return self.layout.index(letter)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def num_slots(self) -> int:  # S
        return self.k.shape[self._axis("S")]

    @property
    def num_kv_heads(self) -> int:  # K
        return self.k.shape[self._axis("K")]

    @property
    def head_dim(self) -> int:  # H
        return self.k.shape[3]

    @property
    def dtype(self) -> jnp.dtype:
        return self.k.dtype

    def kv(self, layout: str = "BSKH") -> tuple[jax.Array, jax.Array]:
        """k, v in `layout` (a transpose when it differs from the stored one)."""
        if layout == self.layout:
            return self.k, self.v
        return jnp.swapaxes(self.k, 1, 2), jnp.swapaxes(self.v, 1, 2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedView:
    """A page pool k/v [M, P, K, H], page table int32 [B, R] (R pages per row; an entry
    past the row's last page may be anything in [0, M)), positions per pool slot
    [M, P] (-1 empty) and row lengths [B] (logical slots)."""

    k_pages: Float[Array, "M P K H"]
    v_pages: Float[Array, "M P K H"]
    page_table: Int[Array, "B R"]
    positions: Int[Array, "M P"]
    lengths: Int[Array, " B"] | None = None

    @property
    def batch_size(self) -> int:
        return self.page_table.shape[0]

    @property
    def page_size(self) -> int:  # P
        return self.k_pages.shape[1]

    @property
    def num_slots(self) -> int:  # S = R * P logical slots per row
        return self.page_table.shape[1] * self.page_size

    @property
    def num_kv_heads(self) -> int:
        return self.k_pages.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_pages.shape[3]

    @property
    def dtype(self) -> jnp.dtype:
        return self.k_pages.dtype

    def validate(self) -> None:
        if self.k_pages.ndim != 4 or self.v_pages.shape != self.k_pages.shape:
            raise ValueError(f"PagedView k_pages/v_pages must be [M, P, K, H] and equal, got "
                             f"{self.k_pages.shape} and {self.v_pages.shape}")
        m, p = self.k_pages.shape[:2]
        if self.page_table.ndim != 2 or not jnp.issubdtype(self.page_table.dtype, jnp.integer):
            raise ValueError(f"PagedView.page_table must be integer [B, R], got {self.page_table.dtype}{self.page_table.shape}")
        if tuple(self.positions.shape) != (m, p):
            raise ValueError(f"PagedView.positions must have shape {(m, p)} (per pool slot), got {self.positions.shape}")
        _check_lengths("PagedView", self.lengths, self.batch_size)


def _check_lengths(name: str, lengths: jax.Array | None, b: int) -> None:
    if lengths is not None and (tuple(lengths.shape) != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer)):
        raise ValueError(f"{name}.lengths must be integer [B={b}], got {lengths.dtype}{tuple(lengths.shape)}")


# ------------------------------------------------------------------ quantized codes


def dequantize(
    packed: UInt8[Array, "B S K Hp"], scale: jax.Array, zero: jax.Array, *, bits: int, group_size: int, axis: str
) -> Float[Array, "B S K H"]:
    """codes * scale + zero; `axis` "channel": scale/zero [B, S/g, K, H] (one per channel and
    group of g tokens); "token": [B, S, K, H/g] (one per token and group of g channels)."""
    codes = unpack_codes(packed, bits).astype(scale.dtype)
    rep = 1 if axis == "channel" else 3
    scale = jnp.repeat(scale, group_size, axis=rep)
    zero = jnp.repeat(zero, group_size, axis=rep)
    return codes * scale + zero


def add_corrections(
    x: Float[Array, "B S K H"], group_size: int, a: jax.Array | None, b: jax.Array | None,
    outlier_values: jax.Array | None, outlier_index: jax.Array | None,
) -> Float[Array, "B S K H"]:
    """x + a @ b per group of g tokens (a [B, S, K, R], b [B, S/g, K, R, H]), then the
    outliers (values/index [B, S/g, K, O]) written back exactly."""
    bsz, s, kh, h = x.shape
    g = group_size
    out = x.astype(jnp.float32).reshape(bsz, s // g, g, kh, h)
    if a is not None:
        lr = jnp.einsum("bngkr,bnkrh->bngkh", a.astype(jnp.float32).reshape(bsz, s // g, g, kh, -1),
                        b.astype(jnp.float32))
        out = out + lr
    if outlier_values is not None:
        block = jnp.moveaxis(out, 3, 2).reshape(bsz, s // g, kh, g * h)
        rows = jnp.indices(outlier_index.shape)
        block = block.at[rows[0], rows[1], rows[2], outlier_index.astype(jnp.int32)].set(
            outlier_values.astype(jnp.float32))
        out = jnp.moveaxis(block.reshape(bsz, s // g, kh, g, h), 2, 3)
    return out.reshape(bsz, s, kh, h).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedView(ResidualStoreView):
    """KIVI-style quantized keys/values (S slots) plus a full-precision residual (R slots).

    k_codes/v_codes: uint8 [B, S, K, H * bits / 8]; scales/zeros per `k_axis`/`v_axis`
    (see `dequantize`); positions [B, S] of the quantized slots; lengths [B]: the
    quantized slots in use; residual_k/v [B, R, K, H] with residual_positions [B, R].
    Logical slot order is the S quantized slots, then the R residual ones.
    Optional GEAR corrections (Kang et al. 2024), per k/v: a rank-R approximation of the
    quantization error of each group of g slots (`*_lowrank_a` [B, S, K, R] per slot,
    `*_lowrank_b` [B, S/g, K, R, H] per group) and exact outliers (`*_outlier_values` and
    int16 `*_outlier_index` into the group's flattened [g, H] block, [B, S/g, K, O]).
    Optional exact sink slots `sink_k`/`sink_v` [B, n, K, H]: quantized slots 0 .. n-1 (n <= g)
    read exactly (attention sinks kept by the cache).
    """

    k_codes: UInt8[Array, "B S K Hp"]
    k_scale: jax.Array
    k_zero: jax.Array
    v_codes: UInt8[Array, "B S K Hp"]
    v_scale: jax.Array
    v_zero: jax.Array
    positions: Int[Array, "B S"]
    residual_k: Float[Array, "B R K H"]
    residual_v: Float[Array, "B R K H"]
    residual_positions: Int[Array, "B R"]
    lengths: Int[Array, " B"] | None = None
    k_lowrank_a: jax.Array | None = None
    k_lowrank_b: jax.Array | None = None
    k_outlier_values: jax.Array | None = None
    k_outlier_index: jax.Array | None = None
    v_lowrank_a: jax.Array | None = None
    v_lowrank_b: jax.Array | None = None
    v_outlier_values: jax.Array | None = None
    v_outlier_index: jax.Array | None = None
    sink_k: Float[Array, "B n K H"] | None = None
    sink_v: Float[Array, "B n K H"] | None = None
    bits: int = _static(4)
    group_size: int = _static(32)
    k_axis: str = _static("channel")
    v_axis: str = _static("token")

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS:
            raise ValueError(f"QuantizedView.bits must be one of {QUANT_BITS}, got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"QuantizedView.group_size must be a positive int, got {self.group_size!r}")
        for name in ("k_axis", "v_axis"):
            if getattr(self, name) not in QUANT_AXES:
                raise ValueError(f"QuantizedView.{name} must be one of {QUANT_AXES}, got {getattr(self, name)!r}")

    @property
    def has_corrections(self) -> bool:
        """GEAR's corrections or exact sinks: what a kernel reading the codes alone would miss."""
        return self.sink_k is not None or any(getattr(self, f"{p}_{name}") is not None for p in "kv"
                                              for name in ("lowrank_a", "outlier_values"))

    def corrections(self, prefix: str) -> tuple:
        """(lowrank_a, lowrank_b, outlier_values, outlier_index) of "k" or "v" (None where absent)."""
        return tuple(getattr(self, f"{prefix}_{name}")
                     for name in ("lowrank_a", "lowrank_b", "outlier_values", "outlier_index"))

    def dequantize_block(self, start: Int[Array, ""] | int, size: int) -> tuple[jax.Array, jax.Array]:
        """Keys and values of quantized slots [start, start + size) (whole groups) in the view
        dtype: codes * scale + zero, GEAR's corrections of those groups, the exact sinks."""
        g = self.group_size
        cut = lambda x, first, n: jax.lax.dynamic_slice_in_dim(x, first, n, axis=1)  # noqa: E731
        per_group = (start // g, size // g)
        scales = lambda axis: per_group if axis == "channel" else (start, size)  # noqa: E731
        q = dict(bits=self.bits, group_size=g)
        k = dequantize(cut(self.k_codes, start, size), cut(self.k_scale, *scales(self.k_axis)),
                       cut(self.k_zero, *scales(self.k_axis)), axis=self.k_axis, **q).astype(self.dtype)
        v = dequantize(cut(self.v_codes, start, size), cut(self.v_scale, *scales(self.v_axis)),
                       cut(self.v_zero, *scales(self.v_axis)), axis=self.v_axis, **q).astype(self.dtype)
        if self.has_corrections:  # GEAR: lowrank_a per slot; lowrank_b, outliers per group
            def block(fields: tuple) -> tuple:
                return tuple(None if x is None else cut(x, *((start, size) if i == 0 else per_group))
                             for i, x in enumerate(fields))
            k = add_corrections(k, g, *block(self.corrections("k")))
            v = add_corrections(v, g, *block(self.corrections("v")))
        return self.overlay_sinks(k, v, start, size)

    def validate(self) -> None:
        b, s, kh, h = self.batch_size, self.num_quantized, self.num_kv_heads, self.head_dim
        packed = (b, s, kh, h * self.bits // 8)
        for name in ("k_codes", "v_codes"):
            x = getattr(self, name)
            if tuple(x.shape) != packed or x.dtype != jnp.uint8:
                raise ValueError(f"QuantizedView.{name} must be uint8 {packed}, got {x.dtype}{tuple(x.shape)}")
        g = self.group_size
        for prefix, axis in (("k", self.k_axis), ("v", self.v_axis)):
            want = (b, s // g, kh, h) if axis == "channel" else (b, s, kh, h // g)
            if (s if axis == "channel" else h) % g:
                raise ValueError(f"QuantizedView.group_size={g} must divide the {axis} groups' axis")
            for name in (f"{prefix}_scale", f"{prefix}_zero"):
                if tuple(getattr(self, name).shape) != want:
                    raise ValueError(f"QuantizedView.{name} must have shape {want}, got {getattr(self, name).shape}")
        if tuple(self.positions.shape) != (b, s):
            raise ValueError(f"QuantizedView.positions must have shape {(b, s)}, got {self.positions.shape}")
        self.validate_residual()
        self.validate_sinks(g)


KVView = DenseView | PagedView | QuantizedView | LowBitView | MixedPrecisionView | QuestView
VIEW_TYPES = (DenseView, PagedView, QuantizedView, LowBitView, MixedPrecisionView, QuestView)
# S quantized slots, then a full-precision residual:
QUANTIZED_VIEWS = (QuantizedView, LowBitView, MixedPrecisionView)


def slot_positions(view: KVView) -> Int[Array, "B S"] | Int[Array, "B K S"]:
    """Positions of the view's logical slots [B, S] (a dense view's may be per KV head,
    [B, K, S]), -1 where empty (lengths applied)."""
    if isinstance(view, QuestView):
        return slot_positions(view.dense())
    b, s = view.batch_size, view.num_slots
    if isinstance(view, DenseView):
        pos = view.positions
        if pos is None:
            pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    elif isinstance(view, PagedView):
        pages = jnp.clip(view.page_table, 0, view.k_pages.shape[0] - 1)
        pos = view.positions[pages].reshape(b, s)
    else:
        pos = view.positions
    pos = pos.astype(jnp.int32)
    if view.lengths is not None:
        n = view.positions.shape[1] if isinstance(view, QUANTIZED_VIEWS) else s
        inside = jnp.arange(n, dtype=jnp.int32)[None, :] < view.lengths[:, None]
        pos = jnp.where(inside[:, None] if pos.ndim == 3 else inside, pos, -1)
    if isinstance(view, QUANTIZED_VIEWS):
        pos = jnp.concatenate([pos, view.residual_positions.astype(jnp.int32)], axis=1)
    return pos


def dense_kv(view: KVView, layout: str = "BSKH") -> tuple[jax.Array, jax.Array]:
    """Keys and values of every logical slot in `layout`: a transpose for a dense view,
    a page gather for a paged one, dequantization for a quantized one. Meant to run
    inside the attention computation (XLA fuses it); a cache never stores this."""
    if isinstance(view, QuestView):
        view = view.dense()
    if isinstance(view, DenseView):
        return view.kv(layout)
    if isinstance(view, PagedView):
        b, s = view.batch_size, view.num_slots
        pages = jnp.clip(view.page_table, 0, view.k_pages.shape[0] - 1)
        k = view.k_pages[pages].reshape(b, s, view.num_kv_heads, view.head_dim)
        v = view.v_pages[pages].reshape(b, s, view.num_kv_heads, view.head_dim)
    else:  # QuantizedView, LowBitView, MixedPrecisionView
        k, v = view.dequantize_block(0, view.num_quantized)
        k = jnp.concatenate([k, view.residual_k], axis=1)
        v = jnp.concatenate([v, view.residual_v], axis=1)
    if layout == "BKSH":
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    return k, v
