"""Shapes shared by the views of a quantized store plus a full-precision residual."""

from __future__ import annotations

import jax.numpy as jnp


class ResidualStoreView:
    """k_codes [B, S, K, ...] quantized slots, then residual_k [B, R, K, H]: the shape
    properties of `QuantizedView` (KIVI) and `LowBitView` (VidKV)."""

    @property
    def batch_size(self) -> int:
        return self.k_codes.shape[0]

    @property
    def num_quantized(self) -> int:
        return self.k_codes.shape[1]

    @property
    def num_slots(self) -> int:  # S + R
        return self.k_codes.shape[1] + self.residual_k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k_codes.shape[2]

    @property
    def head_dim(self) -> int:
        return self.residual_k.shape[3]

    @property
    def dtype(self) -> jnp.dtype:
        return self.residual_k.dtype
