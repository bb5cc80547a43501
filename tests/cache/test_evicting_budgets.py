"""Budgets per (layer, KV head) for EvictingKVCache: PyramidKV's depth schedule and
retrieval heads (RazorAttention / DuoAttention) in ragged storage that costs the sum of
the budgets; each unit holds exactly its own budget; tree commits stay exact; the head
scores behind the retrieval heads are attention probabilities; bad tables refused."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from cache.test_evicting_cache import CHUNKS, _dense_logits, _model, _run, _tokens, assert_same_entries

from efficient.cache.budgets import (
    kept_fraction,
    pyramid_budgets,
    retrieval_head_budgets,
    retrieval_heads_for_fraction,
)
from efficient.cache.evicting import EvictingKVCache
from efficient.cache.press import H2OPress, StreamingLLMPress
from efficient.cache.retrieval_heads import head_scores, repeated_random_tokens
from efficient.models import jit_forward

PYRAMID = pyramid_budgets(10, 2, 2, floor=6)  # [[14, 14], [6, 6]]


def _cache(budget, press=None, max_step: int = 8) -> EvictingKVCache:  # noqa: ANN001
    return EvictingKVCache.for_model(_model().config, 2, 64, press=press or H2OPress(window=2), budget=budget,
                                     max_step=max_step)


def test_pyramid_budgets_fall_with_depth_and_keep_the_mean() -> None:
    assert PYRAMID.tolist() == [[14, 14], [6, 6]]
    table = pyramid_budgets(100, 30, 3, beta=20, floor=36)
    assert table.sum() == 100 * 30 * 3 and (np.diff(table[:, 0]) <= 0).all()
    assert table[0, 0] in (164, 165) and table[-1, 0] == 36  # 2 x 100 - 36 down to max(36, 100 / 20), rounded
    assert kept_fraction(table, 400) == pytest.approx(0.25)


def test_ragged_storage_costs_the_sum_of_the_budgets_and_each_unit_holds_its_own() -> None:
    cache = _cache(PYRAMID)
    assert cache.k.shape == (2, 2 * (8 + 14) + 2 * (8 + 6), 16)  # not 4 x (8 + 14)
    assert cache.nbytes() < _cache(14).nbytes()
    before = cache.nbytes()
    logits, cache = _run(cache)
    # the second layer's budget 6 is outgrown at the second forward's reserve (8 held)
    np.testing.assert_allclose(logits[:, :8], _dense_logits()[:, :8], rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits[:, 8], _dense_logits()[:, 8], atol=1e-3)
    assert cache.nbytes() == before and np.isfinite(logits).all()
    held = np.asarray(cache.held)  # L B K
    assert (held[0] == 14 + CHUNKS[-1]).all() and (held[1] == 6 + CHUNKS[-1]).all()
    positions = np.asarray(cache.entry_positions)
    assert ((positions >= 0).sum(-1) == held).all()
    assert (positions[1, ..., 8 + 6:] == -1).all()  # past the small units' regions: never written


def test_retrieval_heads_keep_every_token_and_streaming_heads_a_sink_and_window() -> None:
    retrieval = np.asarray([[True, False], [False, True]])
    table = retrieval_head_budgets(retrieval, 64, 6)
    logits, cache = _run(_cache(table, StreamingLLMPress(sinks=2, window=4)))
    assert np.isfinite(logits).all()
    positions = np.asarray(cache.entry_positions)
    for layer, head in np.ndindex(*retrieval.shape):
        for row in range(2):
            held = sorted(int(p) for p in positions[layer, row, head] if p >= 0)
            assert held == (list(range(34)) if retrieval[layer, head] else [0, 1, 29, 30, 31, 32, 33])


def test_a_tree_commit_is_exact_with_a_budget_per_unit() -> None:
    _, cache = _run(_cache(PYRAMID), chunks=[8, 8, 8])
    tokens, path = _tokens(2)[:, :4], _tokens(2)[:, jnp.asarray([0, 2])]
    step = jit_forward(_model(), donate_cache=False)
    start = cache.lengths
    depth = jnp.asarray([0, 1, 1, 2], jnp.int32)
    tree_mask = jnp.asarray([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], bool)[None].repeat(2, axis=0)
    _, tree = step(tokens, positions=cache.next_positions(1) + depth[None, :], cache=cache, tree_mask=tree_mask)
    tree = tree.select(jnp.stack([start, start + 2], axis=1), jnp.asarray([2, 2]), start)
    _, chain = step(path, positions=cache.next_positions(2), cache=cache)
    assert_same_entries(tree, chain, atol=1e-5)


@functools.cache
def _two_token_scores() -> tuple[np.ndarray, np.ndarray]:
    tokens = _tokens(5)[:, :2]
    on_first, on_itself = head_scores(_model(), tokens, np.asarray([[-1, 0]] * 2), np.asarray([[-1, 1]] * 2))
    return on_first, on_itself


def test_head_scores_are_attention_probabilities() -> None:
    """The second query sees keys 0 and 1 only: its mass on them sums to 1 in every head."""
    on_first, on_itself = _two_token_scores()
    assert on_first.shape == (2, 2) and (on_first > 0).all() and (on_itself > 0).all()
    np.testing.assert_allclose(on_first + on_itself, 1.0, atol=1e-5)


def test_repeated_random_tokens_target_the_previous_occurrence_and_its_successor() -> None:
    tokens, echo, induction = repeated_random_tokens(2, 5, 10, 40, seed=1)
    assert tokens.shape == (2, 10) and (tokens[:, :5] == tokens[:, 5:]).all()
    rows = np.arange(2)[:, None]
    second = np.arange(5, 10)[None, :].repeat(2, axis=0)
    assert (tokens[rows, echo[:, 5:]] == tokens[rows, second]).all() and (echo[:, :5] == -1).all()
    assert (induction[:, 5:9] == echo[:, 5:9] + 1).all() and (induction[:, 9] == -1).all()


def test_retrieval_heads_for_a_kept_fraction() -> None:
    scores = np.asarray([[0.1, 0.9, 0.3], [0.8, 0.2, 0.5]])
    chosen = retrieval_heads_for_fraction(scores, capacity=100, streaming_budget=10, kept=0.5)
    # 6 units: 0.5 * 600 = 300 entries; streaming costs 60, each retrieval head 90 more: 2 heads
    assert chosen.tolist() == [[False, True, False], [True, False, False]]
    assert kept_fraction(retrieval_head_budgets(chosen, 100, 10), 100) <= 0.5


def test_bad_budget_tables_are_refused_with_the_argument_named() -> None:
    with pytest.raises(ValueError, match=r"budget must be an int or an int table \[num_layers, num_kv_heads\]"):
        _cache(np.full((3, 2), 8))
    with pytest.raises(ValueError, match="budget 4 is smaller than the press's sinks \\+ window"):
        _cache(np.asarray([[8, 8], [4, 8]]), StreamingLLMPress(sinks=2, window=4))
    with pytest.raises(ValueError, match="floor 12 is larger than the mean budget 10"):
        pyramid_budgets(10, 2, 2, floor=12)
    with pytest.raises(ValueError, match="beta must be at least 1"):
        pyramid_budgets(10, 2, 2, beta=0.5)
    with pytest.raises(ValueError, match="retrieval must be a bool table"):
        retrieval_head_budgets(np.ones((2, 2)), 64, 6)
    with pytest.raises(ValueError, match="streaming_budget 80 is larger than the capacity 64"):
        retrieval_head_budgets(np.ones((2, 2), bool), 64, 80)
    with pytest.raises(ValueError, match="targets has no query with a target"):
        head_scores(_model(), _tokens()[:, :4], -np.ones((2, 4), np.int32))
    with pytest.raises(ValueError, match="must hold 8 distinct tokens"):
        repeated_random_tokens(2, 8, 0, 5)


def test_a_long_prompt_is_evicted_by_one_sort_the_same_as_by_argmin_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """40 tokens over budgets of 6 and 14 (drops past SORT_ABOVE), random scores with ties:
    the sort keeps the same entries as one argmin pass per dropped entry."""
    import efficient.cache.evicting as evicting

    cache = EvictingKVCache.init(num_layers=2, batch_size=2, capacity=64, num_kv_heads=2, head_dim=4,
                                 press=H2OPress(sinks=1, window=2), budget=PYRAMID, max_step=40)
    cache, _ = cache.reserve(jnp.arange(40, dtype=jnp.int32)[None, :].repeat(2, axis=0))
    scores = np.random.default_rng(0).integers(0, 5, cache.scores.shape).astype(np.float32)  # ties
    cache = cache.__class__(**{**cache.__dict__, "scores": jnp.asarray(scores)})
    kept = {}
    for threshold in (16, 10_000):
        monkeypatch.setattr(evicting, "SORT_ABOVE", threshold)
        kept[threshold] = np.asarray(cache._evict().entry_positions)
    np.testing.assert_array_equal(kept[16], kept[10_000])
    assert ((kept[16] >= 0).sum(-1) == np.asarray(PYRAMID)[:, None, :]).all()
