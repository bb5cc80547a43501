"""KV caches: the protocol and its layouts."""

from efficient.cache.dense import DenseKVCache
from efficient.cache.evicting import EvictingKVCache
from efficient.cache.hybrid import HybridKVCache, default_cache
from efficient.cache.kivi import KIVICache
from efficient.cache.paged import PagedKVCache
from efficient.cache.press import H2OPress, Press, SnapKVPress, StreamingLLMPress, TOVAPress
from efficient.cache.protocol import KVCache, KVView, tree_nbytes
from efficient.cache.quest import QuestKVCache
from efficient.cache.ring import RingKVCache
from efficient.cache.vidkv import VidKVCache
from efficient.cache.zipcache import ZipCache

__all__ = ["DenseKVCache", "EvictingKVCache", "H2OPress", "HybridKVCache", "KIVICache", "KVCache", "KVView",
           "PagedKVCache", "Press", "QuestKVCache", "RingKVCache", "SnapKVPress", "StreamingLLMPress", "TOVAPress", "VidKVCache",
           "ZipCache", "default_cache", "tree_nbytes"]
