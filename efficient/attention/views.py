"""What attention reads: typed views of keys and values, as the cache stores them.

A view is a registered pytree. The dispatcher hands it to the implementations
that declare they serve its type, so a cache is read in place (a paged view
through its page table, a quantized view from its codes) and never copied into
a dense float array first. `DenseView` is the view of plain arrays (no cache, or
the dense cache).

Slot semantics shared by every view: slot s of row b holds the token at
`positions[b, s]` (-1: empty); when `lengths` is given, every slot
s >= lengths[b] is empty for row b, so an implementation may skip reading it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseView:
    """Keys and values [B, S, K, H] with slot positions [B, S] and optional lengths [B]."""

    k: Float[Array, "B S K H"]
    v: Float[Array, "B S K H"]
    positions: Int[Array, "B S"] | None = None
    lengths: Int[Array, " B"] | None = None

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def num_slots(self) -> int:  # S
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:  # K
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:  # H
        return self.k.shape[3]

    @property
    def dtype(self) -> jnp.dtype:
        return self.k.dtype


KVView = DenseView  # the union of view types, as more layouts are added
