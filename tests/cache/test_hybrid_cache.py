"""The hybrid cache (ring buffers for sliding-window layers, dense for global ones)
equals the dense cache through prefill, decode, chunks, rollback, ragged padding,
tree commits and both generation loops, on a 7-layer Gemma 3 pattern (5 local : 1
global) and an all-windowed (Mistral-style) model whose rings wrap many times."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.speculative import RAGGED_PROMPTS, OracleDrafter, assert_matches_greedy, greedy_future
from helpers.tiny import tiny_model

from efficient.cache import DenseKVCache, HybridKVCache, RingKVCache, default_cache
from efficient.decoding import generate
from efficient.models import LlamaModel, ModelConfig, forward, jit_forward

WINDOW = 4
TOL = dict(rtol=1e-5, atol=1e-5)


@functools.cache
def gemma3() -> LlamaModel:
    config = ModelConfig.from_hf(dict(
        model_type="gemma3_text", vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
        max_position_embeddings=128, rms_norm_eps=1e-5, query_pre_attn_scalar=8, pad_token_id=0),
        dtype="float32")
    return tiny_model_like(config)


def tiny_model_like(config: ModelConfig) -> LlamaModel:
    graphdef, state = nnx.split(LlamaModel(config, rngs=nnx.Rngs(1)))
    state = jax.tree_util.tree_map(lambda x: x * 8.0 if x.ndim >= 2 else x, state)
    return nnx.merge(graphdef, state)


@functools.cache
def _compiled(model: LlamaModel) -> tuple:
    """(prefill into an empty cache, step) compiled once per model and shared by the tests
    (prompts of 12 tokens, steps of 1 and 3 tokens: a handful of compiled shapes)."""
    def prefill(cache, tokens, positions):  # noqa: ANN001, ANN202
        return forward(model, tokens, positions=positions, cache=cache, fresh_cache=True)

    return jax.jit(prefill), jit_forward(model)


def _prefill(model: LlamaModel, cache, tokens, positions=None):  # noqa: ANN001, ANN202
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return _compiled(model)[0](cache, tokens, positions)


def mistral() -> LlamaModel:
    return tiny_model(sliding_window=WINDOW, sliding_layers=(True, True), max_position_embeddings=128)


def _tokens(seed: int, b: int = 2, t: int = 24) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(1, 61, size=(b, t)), jnp.int32)


def _hybrid(model: LlamaModel, b: int = 2, capacity: int = 48, max_step: int = 3) -> HybridKVCache:
    return HybridKVCache.for_model(model.config, b, capacity, max_step=max_step)


@pytest.mark.parametrize("make", [gemma3, mistral], ids=["gemma3_5to1", "all_windowed"])
def test_prefill_decode_and_chunks_equal_full_forward(make) -> None:  # noqa: ANN001
    model = make()
    tokens = _tokens(0)
    full, _ = forward(model, tokens)
    cache = _hybrid(model)
    assert cache.ring.ring_size == WINDOW + 3 - 1 < tokens.shape[1]  # the ring wraps several times
    got, cache = _prefill(model, cache, tokens[:, :12])  # longer than the ring
    logits = [got]
    step = _compiled(model)[1]
    for start, size in ((12, 3), (15, 3), (18, 1), (19, 1), (20, 1), (21, 3)):
        got, cache = step(tokens[:, start:start + size], cache=cache)
        logits.append(got)
    np.testing.assert_allclose(np.concatenate(logits, axis=1), np.asarray(full), **TOL)
    assert np.abs(np.asarray(full)).max() > 1.0  # the comparison is not between near-zero logits
    np.testing.assert_array_equal(np.asarray(cache.lengths), [24, 24])
    np.testing.assert_array_equal(np.sort(np.asarray(cache.ring.ring_positions), axis=1), [list(range(18, 24))] * 2)


def test_rollback_and_ragged_left_padding_equal_dense() -> None:
    model = gemma3()
    tokens = _tokens(1, t=16)
    # row 1 is left-padded by 3 (position -1), as generate does for a ragged batch
    positions = jnp.asarray([list(range(12)), [-1, -1, -1] + list(range(9))], jnp.int32)
    caches = {"dense": DenseKVCache.for_model(model.config, 2, 48), "hybrid": _hybrid(model)}
    out = {}
    for name, cache in caches.items():
        step = _compiled(model)[1]
        first, cache = _prefill(model, cache, tokens[:, :12], positions)
        wrong, cache = step((tokens[:, 12:15] + 7) % 61, cache=cache)
        cache = cache.truncate(jnp.asarray([12, 13], jnp.int32))  # row 1 keeps one wrong token
        right, cache = step(tokens[:, 13:16], cache=cache)
        out[name] = (first, wrong, right, cache.next_positions(1))
    for dense, hybrid in zip(out["dense"], out["hybrid"], strict=True):
        np.testing.assert_allclose(np.asarray(hybrid), np.asarray(dense), **TOL)
    np.testing.assert_array_equal(np.asarray(out["hybrid"][3]), [[15], [13]])


def test_select_compacts_a_tree_path_like_dense() -> None:
    model = gemma3()
    tokens = _tokens(2, t=16)
    out = {}
    for name, cache in (("dense", DenseKVCache.for_model(model.config, 2, 48)), ("hybrid", _hybrid(model))):
        step = _compiled(model)[1]
        _, cache = _prefill(model, cache, tokens[:, :12])
        # 3 new tokens as a tree: root 0 with children 1 and 2 (siblings at one position)
        tree_mask = jnp.asarray([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)[None].repeat(2, 0)
        positions = jnp.asarray([[12, 13, 13]] * 2, jnp.int32)
        _, cache = step(tokens[:, 12:15], positions=positions, cache=cache, tree_mask=tree_mask)
        # row 0 accepts root + node 2, row 1 the root only
        cache = cache.select(jnp.asarray([[12, 14], [12, 13]], jnp.int32), jnp.asarray([2, 1], jnp.int32),
                             jnp.asarray([12, 12], jnp.int32))
        out[name], _ = step(tokens[:, 15:16], cache=cache)
    np.testing.assert_allclose(np.asarray(out["hybrid"]), np.asarray(out["dense"]), **TOL)


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_speculative_decoding_on_the_hybrid_cache_equals_greedy(tree: bool) -> None:
    model = gemma3()
    future = greedy_future(model, RAGGED_PROMPTS, 24)
    cache = functools.partial(HybridKVCache.for_model, max_step=16)  # ring 19 < capacity 64
    assert_matches_greedy(model, OracleDrafter(future=future, length=4, tree=tree), RAGGED_PROMPTS,
                          cache=cache, capacity=64)


def test_generate_defaults_to_the_hybrid_cache_and_equals_dense() -> None:
    model = mistral()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    built = []

    def recording(config, batch, capacity):  # noqa: ANN001, ANN202
        cache = _hybrid(model, batch, capacity, max_step=2)
        built.append(cache)
        return cache

    dense = generate(model, prompts, max_new_tokens=20, stop_tokens=(), cache=DenseKVCache.for_model)
    hybrid = generate(model, prompts, max_new_tokens=20, stop_tokens=(), cache=recording)
    assert hybrid.sequences() == dense.sequences()
    assert built[0].ring.ring_size == WINDOW + 1
    assert isinstance(default_cache(model.config, 1, 1024), HybridKVCache)
    assert isinstance(default_cache(model.config, 1, 64), DenseKVCache)  # a ring would not be smaller
    assert isinstance(default_cache(tiny_model().config, 1, 1024), DenseKVCache)  # no window


def test_memory_is_flat_in_context_for_windowed_layers() -> None:
    config = gemma3().config  # 6 windowed layers, 1 global
    windowed = mistral().config
    sizes = {s: _hybrid_bytes(config, s) for s in (64, 256, 1024)}
    dense = {s: DenseKVCache.for_model(config, 1, s).nbytes() for s in (64, 256, 1024)}
    one_global = config.replace(num_layers=1, sliding_layers=(), sliding_window=None)
    per_slot_global = (DenseKVCache.for_model(one_global, 1, 3).nbytes()
                       - DenseKVCache.for_model(one_global, 1, 2).nbytes())
    assert sizes[1024] - sizes[64] == (1024 - 64) * per_slot_global  # only the global layer grows
    assert dense[1024] / sizes[1024] > 5.0
    assert len({HybridKVCache.for_model(windowed, 1, s, max_step=3).nbytes() for s in (64, 256, 1024)}) == 1


def _hybrid_bytes(config: ModelConfig, capacity: int) -> int:
    return HybridKVCache.for_model(config, 1, capacity, max_step=3).nbytes()


def test_bad_settings_are_refused_with_the_argument_named() -> None:
    model = gemma3()
    cache = _hybrid(model)
    _, cache = forward(model, _tokens(3, t=5), cache=cache, fresh_cache=True)
    with pytest.raises(ValueError, match="4 tokens in one forward exceed the 3"):
        forward(model, _tokens(3, t=4), cache=cache)
    with pytest.raises(ValueError, match="no sliding-window layer"):
        HybridKVCache.for_model(tiny_model().config, 1, 16)
    ring = RingKVCache.init(num_layers=1, batch_size=1, capacity=32, num_kv_heads=1, head_dim=4, window=4,
                            max_step=2)
    with pytest.raises(ValueError, match="cannot serve a layer with window None"):
        ring.view(0)
    with pytest.raises(ValueError, match="window 8"):
        ring.view(0, window=8)
    with pytest.raises(ValueError, match="max_step must be a positive int"):
        RingKVCache.init(num_layers=1, batch_size=1, capacity=32, num_kv_heads=1, head_dim=4, window=4,
                         max_step=0)
    with pytest.raises(ValueError, match="every layer is windowed"):
        _hybrid(mistral()).view(0)
