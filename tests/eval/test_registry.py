"""The variant registry: built-ins, registration errors, selection, and invariants every
registered variant must keep (later variants are checked here without new tests)."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from helpers.tiny import tiny_model

from efficient import variants
from efficient.cache import DenseKVCache
from efficient.data import ByteTokenizer, eval_windows
from efficient.decoding import GenerateOutput, generate
from efficient.decoding.drafters import FeatureDraftModel, LoadedFeatureDrafter, LoadedHeads, MedusaHeads
from efficient.eval import cache_memory, perplexity

BYTE_MODEL = dict(vocab_size=259, eos_token_ids=(258,), pad_token_id=256)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]
# What the harness can hand a decoder that declares `needs`.
RESOURCES = {"draft_model": lambda: tiny_model(seed=1, **BYTE_MODEL),
             "calibration_tokens": lambda: np.arange(2 * 24, dtype=np.int32).reshape(2, 24) % 250,
             # Untrained (zero) Medusa heads for the tiny model, with made-up accuracies: the tree
             # and the goodput choice are exercised, the heads are not good.
             "medusa_heads": lambda: LoadedHeads(MedusaHeads.init(3, 32, np.arange(200)),
                                                 np.asarray([[0.6, 0.2], [0.4, 0.1], [0.3, 0.1]]), {}),
             # An untrained feature drafter for the tiny model (its layer copied from the target's last).
             "feature_drafter": lambda: LoadedFeatureDrafter(
                 FeatureDraftModel.create(tiny_model(**BYTE_MODEL), rngs=nnx.Rngs(0)), np.arange(200), {})}


def test_built_in_variants_are_registered() -> None:
    assert {"dense", "dense_bf16"} <= {c.name for c in variants.caches()}
    assert {"greedy", "sample"} <= {d.name for d in variants.decoders()}
    assert variants.get_cache("dense").lossless and not variants.get_cache("dense_bf16").lossless
    assert variants.get_decoder("greedy").lossless


def test_registration_errors_and_selection() -> None:
    factory = DenseKVCache.for_model
    with pytest.raises(ValueError, match="already registered"):
        variants.register_cache("dense", factory, lossless=True, description="again")
    with pytest.raises(TypeError, match="lossless"):
        variants.register_cache("tmp_cache", factory, lossless="yes", description="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="description"):
        variants.register_cache("tmp_cache", factory, lossless=True, description=" ")
    with pytest.raises(TypeError, match="callable"):
        variants.register_decoder("tmp_decoder", 3, lossless=True, description="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs"):
        variants.register_decoder("tmp_decoder", generate, lossless=True, description="x", needs="draft_model")
    with pytest.raises(ValueError, match=r"unknown cache \['nope'\]; registered: .*dense"):
        variants.caches("dense,nope")
    assert [c.name for c in variants.caches("dense_bf16, dense")] == ["dense_bf16", "dense"]
    variants.register_cache("tmp_cache", factory, lossless=True, description="a temporary copy of dense")
    try:
        assert variants.caches()[-1].name == "tmp_cache"
        variants.register_cache("tmp_cache", factory, lossless=False, description="replaced", replace=True)
        assert not variants.get_cache("tmp_cache").lossless
    finally:
        variants.unregister("tmp_cache")
    assert "tmp_cache" not in {c.name for c in variants.caches()}
    with pytest.raises(KeyError, match="tmp_cache"):
        variants.unregister("tmp_cache")


@pytest.mark.parametrize("cache", variants.caches(), ids=lambda c: c.name)
def test_every_cache_serves_generate_and_reports_memory(cache: variants.CacheVariant) -> None:
    model = tiny_model(**BYTE_MODEL)
    windows = eval_windows(["def f(x):\n    return x + 1\n", "y = [i for i in range(3)]\n"], ByteTokenizer(), 16)
    dense = perplexity(model, windows, cache=DenseKVCache.for_model, chunk=5)
    mine = perplexity(model, windows, cache=cache.factory, chunk=5)
    reference = generate(model, PROMPTS, max_new_tokens=8)
    out = generate(model, PROMPTS, max_new_tokens=8, cache=cache.factory)
    if cache.lossless:  # lossless: the dense cache's numbers and greedy tokens
        assert mine.nll == pytest.approx(dense.nll, rel=1e-5)
        np.testing.assert_array_equal(out.tokens, reference.tokens)
    else:
        assert mine.nll == pytest.approx(dense.nll, rel=0.05)
    memory = cache_memory(cache.factory, model.config, 2, 64)
    assert memory.bytes > 0 and memory.bytes_per_token == memory.bytes / 128


def test_dense_memory_is_the_size_of_its_buffers() -> None:
    c = tiny_model(**BYTE_MODEL).config  # L=2, K=2, H=8, float32
    kv = 2 * c.num_layers * 3 * 40 * c.num_kv_heads * c.head_dim
    book = 3 * 40 * 4 + 3 * 4  # positions [B, S] and lengths [B], int32
    assert cache_memory(DenseKVCache.for_model, c, 3, 40).bytes == kv * 4 + book
    assert cache_memory(variants.get_cache("dense_bf16").factory, c, 3, 40).bytes == kv * 2 + book
    with pytest.raises(ValueError, match="capacity"):
        cache_memory(DenseKVCache.for_model, c, 3, 0)


@pytest.mark.parametrize("decoder", variants.decoders(), ids=lambda d: d.name)
def test_every_decoder_follows_the_protocol(decoder: variants.DecoderVariant) -> None:
    model = tiny_model(**BYTE_MODEL)
    options = {need: RESOURCES[need]() for need in decoder.needs}
    kwargs = dict(max_new_tokens=6, cache=DenseKVCache.for_model, key=3, stop_tokens=(), **options)
    out = decoder.fn(model, PROMPTS, **kwargs)
    assert isinstance(out, GenerateOutput) and out.tokens.shape == (2, 6)
    assert (out.lengths == 6).all() and out.stats.generated_tokens == 12
    again = decoder.fn(model, PROMPTS, **kwargs)
    np.testing.assert_array_equal(out.tokens, again.tokens)  # the same key, the same output
    greedy = generate(model, PROMPTS, max_new_tokens=6)
    if decoder.lossless and not decoder.sampling:
        np.testing.assert_array_equal(out.tokens, greedy.tokens)  # lossless greedy decoders reproduce greedy


def test_sample_decoder_at_temperature_zero_is_greedy() -> None:
    model = tiny_model(**BYTE_MODEL)
    sample = variants.get_decoder("sample").fn
    out = sample(model, PROMPTS, max_new_tokens=6, cache=None, key=0, stop_tokens=(), temperature=0.0)
    np.testing.assert_array_equal(out.tokens, generate(model, PROMPTS, max_new_tokens=6).tokens)
