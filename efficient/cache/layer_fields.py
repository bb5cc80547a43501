"""Per-layer buffers for caches whose fields carry a leading layer axis.

A cache stacks each layer field as one [L, ...] array, which a layer loop under
`lax.scan` indexes with a traced layer; or (after `split_layers`) holds it as a tuple of
L per-layer buffers, which an unrolled loop reads without XLA:CPU copying the layer's
slice out of the stacked array first (see `LayerStackedKV` in dense.py for the
measurement). A subclass names its layer fields (`layer_fields`; None fields left out)
and reads and writes them through `_stored`, `_set`, `_set_all_layers` and
`_per_layer_map`, which serve both forms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Self

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int


class PerLayerFields:
    """Stacked or per-layer storage of the fields named by `layer_fields` (module docstring)."""

    @property
    def layer_fields(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _layer_shape(self, name: str) -> tuple[int, ...]:
        """(L, ...) of field `name` in either storage."""
        x = getattr(self, name)
        return (len(x), *x[0].shape) if isinstance(x, tuple) else tuple(x.shape)

    @property
    def per_layer(self) -> bool:
        """Whether the layer fields are tuples of per-layer buffers (`split_layers`): what an
        unrolled layer loop reads without copying a layer's slice out of a stacked array."""
        return isinstance(getattr(self, self.layer_fields[0]), tuple)

    def split_layers(self) -> Self:
        """The same cache with per-layer buffers (a copy; for an unrolled layer loop)."""
        if self.per_layer:
            return self
        return dataclasses.replace(self, **{name: tuple(getattr(self, name)) for name in self.layer_fields})

    def stack_layers(self) -> Self:
        """The same cache with stacked [L, ...] arrays (a copy; for a layer loop under scan)."""
        if not self.per_layer:
            return self
        return dataclasses.replace(self, **{name: jnp.stack(getattr(self, name)) for name in self.layer_fields})

    def _stored(self, name: str, layer: int | Int[Array, ""]) -> jax.Array:
        """Field `name` of one layer, as stored."""
        x = getattr(self, name)
        if isinstance(x, tuple):
            if not isinstance(layer, int | np.integer) or isinstance(layer, bool) or not 0 <= layer < len(x):
                raise TypeError(
                    f"{type(self).__name__}: a cache with per-layer buffers (split_layers) needs a Python int "
                    f"layer in [0, {len(x)}), got {layer!r}; a model under lax.scan passes a traced index: "
                    "call cache.stack_layers() or set_layer_loop(model, 'unrolled')")
            return x[int(layer)]
        return x[layer]

    def _set(self, name: str, layer: int | Int[Array, ""], index: tuple, value: jax.Array) -> jax.Array | tuple:
        """Field `name` with one layer's entries at `index` set (dropped where out of range)."""
        x = getattr(self, name)
        if isinstance(x, tuple):
            self._stored(name, layer)  # checks the layer
            return tuple(y.at[index].set(value, mode="drop") if i == layer else y for i, y in enumerate(x))
        return x.at[(layer, *index)].set(value, mode="drop")

    def _per_layer_map(self, name: str, fn: Callable[[jax.Array, tuple], jax.Array]) -> jax.Array | tuple:
        """fn(array, lead) on each layer's buffer (lead ()) or on the stacked array (lead (:,))."""
        x = getattr(self, name)
        return tuple(fn(y, ()) for y in x) if isinstance(x, tuple) else fn(x, (slice(None),))

    def _set_all_layers(self, name: str, index: tuple, values: jax.Array) -> jax.Array | tuple:
        """Field `name` with every layer's entries at `index` set to values [L, ...]."""
        x = getattr(self, name)
        if isinstance(x, tuple):
            return tuple(y.at[index].set(values[i], mode="drop") for i, y in enumerate(x))
        return x.at[(slice(None), *index)].set(values, mode="drop")
