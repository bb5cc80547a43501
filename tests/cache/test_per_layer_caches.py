"""Per-layer buffers (`split_layers`, efficient/cache/layer_fields.py) of the paged cache and of
KIVI, GEAR, VidKV and ZipCache (`GroupQuantizedCache`): with an unrolled layer loop they hold and return
what the stacked cache does, through prefill, decode, rollback (into the packed store) and
tree commits; a traced layer index is refused with the fix named."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tiny import run_in_chunks, tiny_model

from efficient.attention.views import dense_kv, slot_positions
from efficient.cache import KIVICache, PagedKVCache, VidKVCache, ZipCache
from efficient.models import unstack_layers

G, RESIDUAL = 8, 8
CACHES = {
    "gear": lambda config: KIVICache.for_model(config, 2, 64, bits=2, group_size=G, residual_length=RESIDUAL,
                                               rank=2, outlier_fraction=0.05, sinks=2),
    "vidkv": lambda config: VidKVCache.for_model(config, 2, 64, group_size=G, residual_length=RESIDUAL, sinks=2),
    "paged": lambda config: PagedKVCache.for_model(config, 2, 64, page_size=8),
    # Its forwards are at most residual_length tokens (the 13-token chunk below).
    "zipcache": lambda config: ZipCache.for_model(config, 2, 64, group_size=G, residual_length=16),
}


@functools.cache
def _models() -> tuple:
    return tiny_model(head_dim=16), unstack_layers(tiny_model(head_dim=16))


def _tokens(seed: int, t: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(1, 61, size=(2, t)), jnp.int32)


def _arrays(view: object) -> list[np.ndarray]:
    return [np.asarray(x) for x in (*dense_kv(view), slot_positions(view))]


@pytest.mark.parametrize("name", sorted(CACHES))
def test_per_layer_buffers_equal_the_stacked_cache(name: str) -> None:
    stacked_model, unrolled_model = _models()
    make = CACHES[name]
    stacked = make(stacked_model.config)
    split = make(stacked_model.config).split_layers()  # its own bookkeeping arrays: a forward donates the cache
    assert split.per_layer and not stacked.per_layer and split.split_layers() is split
    assert all(isinstance(getattr(split, f), tuple) and len(getattr(split, f)) == stacked.num_layers
               for f in split.layer_fields)
    assert (split.capacity, split.num_layers, split.batch_size, split.num_kv_heads, split.head_dim) == (
        stacked.capacity, stacked.num_layers, stacked.batch_size, stacked.num_kv_heads, stacked.head_dim)
    assert split.nbytes() == stacked.nbytes()
    chunks = [13, 1, 3, 1, 3, 3, 3]  # 27 tokens: flushes from the residual and from the first chunk
    tokens = _tokens(0, sum(chunks))
    want, a = run_in_chunks(stacked_model, stacked, tokens, chunks)
    got, b = run_in_chunks(unrolled_model, split, tokens, chunks)
    assert b.per_layer and (name == "paged" or int(np.min(np.asarray(b.quantized))) > 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def edit(cache):  # noqa: ANN001, ANN202  a tree commit, then a rollback into the packed store
        cache = cache.select(jnp.asarray([[25, 26]] * 2, jnp.int32), jnp.asarray([2, 1], jnp.int32),
                             jnp.asarray([24, 24], jnp.int32))
        return cache.truncate(jnp.asarray([5, 20], jnp.int32))  # row 0 into the first group (its sinks)

    a, b = edit(a), edit(b)
    assert b.per_layer
    for layer in range(a.num_layers):
        for x, y in zip(_arrays(a.view(layer)), _arrays(b.view(layer)), strict=True):
            np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6)
    back = b.stack_layers()
    assert not back.per_layer and a.stack_layers() is a
    for field in a.layer_fields:  # ZipCache's scores and dequantized values may differ in the last bit
        np.testing.assert_allclose(np.asarray(getattr(back, field)), np.asarray(getattr(a, field)), rtol=1e-6,
                                   atol=1e-6)


@pytest.mark.parametrize("name", ["vidkv", "paged"])
def test_per_layer_buffers_refuse_a_traced_layer_index(name: str) -> None:
    split = CACHES[name](_models()[0].config).split_layers()
    with pytest.raises(TypeError, match="per-layer buffers.*stack_layers"):
        jax.jit(lambda cache, layer: cache.view(layer).positions)(split, jnp.int32(0))
    with pytest.raises(TypeError, match="layer in"):
        split.view(split.num_layers)  # out of range
