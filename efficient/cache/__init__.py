"""KV caches: the protocol and its layouts."""

from efficient.cache.dense import DenseKVCache
from efficient.cache.hybrid import HybridKVCache, default_cache
from efficient.cache.kivi import KIVICache
from efficient.cache.paged import PagedKVCache
from efficient.cache.protocol import KVCache, KVView, tree_nbytes
from efficient.cache.ring import RingKVCache

__all__ = ["DenseKVCache", "HybridKVCache", "KIVICache", "KVCache", "KVView", "PagedKVCache", "RingKVCache",
           "default_cache", "tree_nbytes"]
