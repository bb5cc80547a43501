"""KV caches: the protocol and its layouts."""

from efficient.cache.dense import DenseKVCache
from efficient.cache.hybrid import HybridKVCache, default_cache
from efficient.cache.protocol import KVCache, KVView, tree_nbytes
from efficient.cache.ring import RingKVCache

__all__ = ["DenseKVCache", "HybridKVCache", "KVCache", "KVView", "RingKVCache", "default_cache", "tree_nbytes"]
