"""Shapes shared by the views of a quantized store plus a full-precision residual."""

from __future__ import annotations

import jax
import jax.numpy as jnp


class ResidualStoreView:
    """S quantized slots (positions [B, S]), then residual_k [B, R, K, H]: the shape
    properties of `QuantizedView` (KIVI), `LowBitView` (VidKV) and `MixedPrecisionView`
    (ZipCache), and their optional exact
    sink slots (`sink_k`/`sink_v`: the first n quantized slots, kept exact by the cache)."""

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def num_quantized(self) -> int:
        return self.positions.shape[1]

    @property
    def num_slots(self) -> int:  # S + R
        return self.positions.shape[1] + self.residual_k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.residual_k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.residual_k.shape[3]

    @property
    def dtype(self) -> jnp.dtype:
        return self.residual_k.dtype

    def overlay_sinks(self, k: jax.Array, v: jax.Array, start: jax.Array | int, size: int) -> tuple[jax.Array, jax.Array]:
        """Keys/values [B, size, K, H] of quantized slots [start, start + size) with the
        exact sink slots 0 .. n-1 (`sink_k`/`sink_v` [B, n, K, H], n <= size) written over
        them; unchanged without sinks or for a block past them."""
        if self.sink_k is None:
            return k, v
        n = self.sink_k.shape[1]
        is_sink = (start + jnp.arange(size) < n)[None, :, None, None]
        pad = lambda x, like: jnp.pad(x.astype(like.dtype), ((0, 0), (0, size - n), (0, 0), (0, 0)))  # noqa: E731
        return jnp.where(is_sink, pad(self.sink_k, k), k), jnp.where(is_sink, pad(self.sink_v, v), v)

    def validate_sinks(self, group_size: int) -> None:
        if self.sink_k is None and self.sink_v is None:
            return
        b, kh, h = self.batch_size, self.num_kv_heads, self.head_dim
        n = -1 if self.sink_k is None else self.sink_k.shape[1]
        name = type(self).__name__
        for field in ("sink_k", "sink_v"):
            x = getattr(self, field)
            if x is None or tuple(x.shape) != (b, n, kh, h) or not 0 < n <= group_size:
                raise ValueError(f"{name}.{field} must be [B, n <= g={group_size}, K, H] = {(b, n, kh, h)}, got "
                                 f"{None if x is None else tuple(x.shape)}")

    def validate_residual(self) -> None:
        """residual_k/v [B, R, K, H], residual_positions [B, R] and lengths [B] agree."""
        b, r, name = self.batch_size, self.residual_k.shape[1], type(self).__name__
        if self.residual_v.shape != self.residual_k.shape or tuple(self.residual_positions.shape) != (b, r):
            raise ValueError(f"{name} residual_k/v [B, R, K, H] and residual_positions [B, R] disagree: "
                             f"{self.residual_k.shape}, {self.residual_v.shape}, {self.residual_positions.shape}")
        if self.lengths is not None and (tuple(self.lengths.shape) != (b,)
                                         or not jnp.issubdtype(self.lengths.dtype, jnp.integer)):
            raise ValueError(f"{name}.lengths must be integer [B={b}], got {self.lengths.dtype}"
                             f"{tuple(self.lengths.shape)}")

    def validate_fields(self, want: dict[str, tuple[tuple[int, ...], jnp.dtype | None]]) -> None:
        """Each named field has its shape (and dtype, where one is given)."""
        for name, (shape, dtype) in want.items():
            x = getattr(self, name)
            if tuple(x.shape) != shape or (dtype is not None and x.dtype != dtype):
                raise ValueError(f"{type(self).__name__}.{name} must be {dtype or ''}{shape}, got "
                                 f"{x.dtype}{tuple(x.shape)}")
