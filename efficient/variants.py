"""Every built-in variant, registered: `from efficient import variants` then
`variants.caches()`, `variants.decoders()`, `variants.register_cache(...)`.

The registry itself (`efficient.registry`) imports no variant; this module
imports the modules that register the built-in ones.
"""

from __future__ import annotations

import efficient.cache.variants  # noqa: F401  (dense, dense_bf16)
import efficient.decoding.plain_variants  # noqa: F401  (greedy, sample)
import efficient.decoding.speculative_variants  # noqa: F401  (spec_*)
from efficient.registry import (  # noqa: F401
    CacheVariant,
    Decoder,
    DecoderVariant,
    caches,
    decoders,
    get_cache,
    get_decoder,
    register_cache,
    register_decoder,
    unregister,
)
