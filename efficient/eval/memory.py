"""Memory held by a KV cache: `nbytes()` of a cache built for a batch and capacity."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from efficient.cache.protocol import KVCache
from efficient.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class CacheMemory:
    """Bytes a cache holds for `batch` rows of `capacity` token slots."""

    bytes: int
    batch: int
    capacity: int

    @property
    def bytes_per_token(self) -> float:
        """Bytes per token slot (batch x capacity of them)."""
        return self.bytes / (self.batch * self.capacity)

    @property
    def mebibytes(self) -> float:
        return self.bytes / 2**20

    def as_dict(self) -> dict[str, float]:
        return dict(bytes=self.bytes, batch=self.batch, capacity=self.capacity,
                    bytes_per_token=self.bytes_per_token)


def cache_memory(factory: Callable[[ModelConfig, int, int], KVCache], config: ModelConfig, batch: int,
                 capacity: int) -> CacheMemory:
    """Build `factory(config, batch, capacity)` and report its `nbytes()` (the true
    memory held: buffers, scales, page tables, positions, lengths)."""
    for name, value in (("batch", batch), ("capacity", capacity)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    cache = factory(config, batch, capacity)
    nbytes = cache.nbytes()
    if not isinstance(nbytes, int) or nbytes < 0:
        raise TypeError(f"factory: the cache's nbytes() returned {nbytes!r}, expected an int >= 0")
    return CacheMemory(bytes=nbytes, batch=batch, capacity=capacity)
