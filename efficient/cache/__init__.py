"""KV caches: the protocol and its layouts."""

from efficient.cache.dense import DenseKVCache
from efficient.cache.protocol import KVCache, KVView, tree_nbytes

__all__ = ["DenseKVCache", "KVCache", "KVView", "tree_nbytes"]
