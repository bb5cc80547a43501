"""EvictingKVCache and its presses: equal to the dense cache while a row fits its budget;
past it, constant memory, exactly budget + the last forward's tokens held, the tokens
each rule names kept on hand-built attention patterns, no NaN, exact rollback and tree
commits, speculative decoding and chunked-prefill generation; bad settings refused."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.speculative import RAGGED_PROMPTS, OracleDrafter, assert_matches_greedy, greedy_future
from helpers.tiny import run_in_chunks, tiny_model

from efficient.cache import DenseKVCache
from efficient.cache.evicting import EvictingKVCache
from efficient.cache.press import H2OPress, Press, SnapKVPress, StreamingLLMPress, TOVAPress
from efficient.decoding import generate
from efficient.models import forward, jit_forward

PRESSES = {
    "streaming_llm": StreamingLLMPress(sinks=2, window=4),
    "h2o": H2OPress(window=2),
    "tova": TOVAPress(),
    "snapkv": SnapKVPress(window=4, kernel=3),
}
CHUNKS = [8, 1, 8, 8, 8, 1]  # 34 tokens: a prefill, decode steps and chunks (two compiled shapes)


@functools.cache
def _model():  # noqa: ANN202
    return tiny_model(head_dim=16)


def _tokens(seed: int = 0, b: int = 2, t: int = 40) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(1, 61, size=(b, t)), jnp.int32)


def _evicting(press: Press, budget: int, max_step: int = 8, b: int = 2, capacity: int = 64) -> EvictingKVCache:
    return EvictingKVCache.for_model(_model().config, b, capacity, press=press, budget=budget, max_step=max_step)


def _run(cache, chunks=CHUNKS, tokens=None):  # noqa: ANN001, ANN202
    return run_in_chunks(_model(), cache, _tokens() if tokens is None else tokens, chunks)


@functools.cache
def _dense_logits() -> np.ndarray:
    return _run(DenseKVCache.for_model(_model().config, 2, 64))[0]


@pytest.mark.parametrize("name", PRESSES)
def test_equals_dense_while_rows_fit_then_holds_the_budget_in_constant_memory(name: str) -> None:
    cache = _evicting(PRESSES[name], budget=12)
    before = cache.nbytes()
    logits, cache = _run(cache)
    # chunks 8, 1, 8 fill 17 entries (the third chunk's reserve held 9 <= 12); the fourth
    # chunk's reserve is the first to evict
    np.testing.assert_allclose(logits[:, :17], _dense_logits()[:, :17], rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits[:, 17:], _dense_logits()[:, 17:], atol=1e-3)  # something was evicted
    assert cache.nbytes() == before and np.isfinite(logits).all()
    assert (np.asarray(cache.held) == 12 + CHUNKS[-1]).all() and cache.lengths.tolist() == [34, 34]
    positions = np.asarray(cache.entry_positions)  # L B K R
    for row in positions.reshape(-1, positions.shape[-1]):
        assert row[0] == 33 and (row[1:8] == -1).all()  # the last forward's token at entry 0
        kept = row[8:][row[8:] >= 0]
        assert len(kept) == 12 and (np.diff(kept) > 0).all()  # compacted, in order, no duplicate
    view = cache.view(0)
    assert view.k.shape == (2, 2, 12 + 8, 16) and ((np.asarray(view.positions) >= 0).sum(-1) == 13).all()


def test_streaming_llm_keeps_the_sinks_and_the_recent_window() -> None:
    _, cache = _run(_evicting(StreamingLLMPress(sinks=2, window=4), budget=12))
    # the last reserve (before the final token) kept sinks 0, 1 and the 10 newest of 0..32
    want = [33, *[-1] * 7, 0, 1, *range(23, 33)]
    assert (np.asarray(cache.entry_positions) == want).all()


def _scored(press: Press, scores: np.ndarray, budget: int = 6) -> EvictingKVCache:
    """A one-layer, one-row, two-head cache holding positions 0..9 with the given scores,
    then one reserve (which evicts down to the budget)."""
    cache = EvictingKVCache.init(num_layers=1, batch_size=1, capacity=32, num_kv_heads=2, head_dim=4,
                                 press=press, budget=budget, max_step=4)
    cache, _ = cache.reserve(jnp.arange(10, dtype=jnp.int32)[None, :])
    cache = cache.__class__(**{**cache.__dict__, "scores": cache.scores.at[0, 0, :, :10].set(scores)})
    cache, _ = cache.reserve(jnp.asarray([[10]], jnp.int32))
    return cache


def _kept(cache: EvictingKVCache, head: int) -> list[int]:
    row = np.asarray(cache.entry_positions[0, 0, head])
    return sorted(int(p) for p in row[row >= 0])


def test_a_score_press_keeps_sinks_window_and_the_highest_scores_per_head() -> None:
    scores = np.zeros((2, 10), np.float32)
    scores[0, [3, 5, 6]] = [5.0, 4.0, 3.0]
    scores[1, [2, 4]] = [9.0, 8.0]
    cache = _scored(H2OPress(sinks=1, window=2), scores)
    # budget 6: sink 0, window 8-9, then the three best of the rest, per head; then the new token 10
    assert _kept(cache, 0) == [0, 3, 5, 6, 8, 9, 10]
    assert _kept(cache, 1) == [0, 2, 4, 7, 8, 9, 10]  # 2 and 4, then a tie at 0: the earliest goes first


def test_h2o_accumulates_and_tova_replaces_the_attention_received() -> None:
    mass = jnp.zeros((1, 2, 2, 14)).at[0, :, 0, 3].set(1.0).at[0, :, 1, 5].set(1.0)  # B K T R
    q_pos = jnp.asarray([[10, 11]], jnp.int32)
    cache = EvictingKVCache.init(num_layers=1, batch_size=1, capacity=32, num_kv_heads=2, head_dim=4,
                                 press=H2OPress(), budget=10, max_step=4)
    cache, _ = cache.reserve(jnp.arange(12, dtype=jnp.int32)[None, :] - 0)
    h2o = cache.observe(0, mass, q_pos).observe(0, mass, q_pos)
    assert h2o.scores[0, 0, 0, 3] == 2.0 and h2o.scores[0, 0, 0, 5] == 2.0
    tova = cache.__class__(**{**cache.__dict__, "press": TOVAPress()})
    tova = tova.observe(0, mass, q_pos).observe(0, mass, q_pos)
    assert tova.scores[0, 0, 0, 3] == 0.0 and tova.scores[0, 0, 0, 5] == 1.0  # the last query's only


def test_snapkv_votes_come_from_the_observation_window_and_are_pooled() -> None:
    press = SnapKVPress(window=2, kernel=3)
    mass = jnp.zeros((1, 1, 4, 8)).at[0, 0, 0, 1].set(5.0).at[0, 0, 3, 4].set(1.0)
    votes = press.observe(jnp.zeros((1, 1, 8)), mass, jnp.asarray([[4, 5, 6, 7]], jnp.int32))
    # query 0 (position 4) is outside the 2-position window; query 3 votes for entry 4,
    # and the max-pool of width 3 spreads the vote to entries 3 and 5
    np.testing.assert_array_equal(np.asarray(votes[0, 0]), [0, 0, 0, 1, 1, 1, 0, 0])


def assert_same_entries(a: EvictingKVCache, b: EvictingKVCache, row: int | slice = slice(None),
                        scores: bool = False, atol: float = 0.0) -> None:
    """Same tokens at the same entries, and the same keys/values there (an empty entry's
    contents are undefined), within `atol`."""
    for field in ("entry_positions", "entry_slots", "held") + (("scores",) if scores else ()):
        np.testing.assert_array_equal(np.asarray(getattr(a, field))[:, row], np.asarray(getattr(b, field))[:, row],
                                      err_msg=field)
    for layer in range(a.num_layers):
        held = np.asarray(a.entry_slots)[layer, row][..., None] >= 0
        for field in ("k", "v"):
            np.testing.assert_allclose(np.where(held, np.asarray(getattr(a.view(layer), field))[row], 0),
                                       np.where(held, np.asarray(getattr(b.view(layer), field))[row], 0), rtol=0,
                                       atol=atol, err_msg=field)


@pytest.mark.parametrize("name", ["streaming_llm", "h2o"])
def test_rollback_after_eviction_is_exact(name: str) -> None:
    """forward(T) then truncate to a accepted == forward of the a tokens alone (the
    rejected tokens leave nothing behind; H2O's scores also carry the rejected queries'
    attention, so only StreamingLLM's scores are compared)."""
    press = PRESSES[name]
    _, cache = _run(_evicting(press, budget=12), chunks=[8, 8, 8])  # evicting from the third chunk
    tokens = _tokens(1)[:, :8]
    step = jit_forward(_model(), donate_cache=False)
    _, rolled = step(tokens, cache=cache)
    rolled = rolled.truncate(cache.lengths + jnp.asarray([1, 8]))
    for row, accepted in enumerate((1, 8)):
        _, alone = step(tokens[:, :accepted], cache=cache)
        assert_same_entries(rolled, alone, row, scores=name == "streaming_llm")
        assert (np.asarray(rolled.held)[:, row] == 12 + accepted).all()


def test_a_tree_commit_moves_the_accepted_path() -> None:
    _, cache = _run(_evicting(PRESSES["h2o"], budget=12), chunks=[8, 8, 8])
    tokens = _tokens(2)[:, :4]  # a 4-node tree, its 2-token accepted path (two more shapes)
    path = _tokens(2)[:, jnp.asarray([0, 2])]
    step = jit_forward(_model(), donate_cache=False)
    start = cache.lengths
    # a tree: root, its children 1 and 2 (siblings at the same depth), and 1's child 3
    depth = jnp.asarray([0, 1, 1, 2], jnp.int32)
    _, tree = step(tokens, positions=cache.next_positions(1) + depth[None, :], cache=cache,
                   tree_mask=jnp.asarray([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], bool)[None]
                   .repeat(2, axis=0))
    tree = tree.select(jnp.stack([start, start + 2], axis=1), jnp.asarray([2, 2]), start)
    _, chain = step(path, positions=cache.next_positions(2), cache=cache)
    assert_same_entries(tree, chain, atol=1e-5)  # deeper layers attended over masked tree nodes: rounding


@pytest.mark.parametrize("name", ["streaming_llm", "h2o"])
def test_generate_prefills_in_chunks_and_runs_past_the_budget(name: str) -> None:
    model = _model()
    prompts = [list(range(1, 30)), list(range(5, 17))]
    roomy = functools.partial(EvictingKVCache.for_model, press=PRESSES[name], budget=60, max_step=8)
    dense = generate(model, prompts, max_new_tokens=12)
    # a budget that holds everything: chunked prefill and decode equal the dense cache
    np.testing.assert_array_equal(generate(model, prompts, max_new_tokens=12, cache=roomy, capacity=64).tokens,
                                  dense.tokens)
    tight = functools.partial(EvictingKVCache.for_model, press=PRESSES[name], budget=10, max_step=8)
    out = generate(model, prompts, max_new_tokens=12, cache=tight, capacity=64)
    assert out.tokens.shape == dense.tokens.shape and (np.asarray(out.tokens) >= 0).all()


def test_speculative_decoding_equals_greedy_while_the_budget_holds_the_rows() -> None:
    model = _model()
    future = greedy_future(model, RAGGED_PROMPTS, 24)
    cache = functools.partial(EvictingKVCache.for_model, press=PRESSES["h2o"], budget=40, max_step=8)
    assert_matches_greedy(model, OracleDrafter(future=future, length=4, tree=False), RAGGED_PROMPTS,
                          cache=cache, capacity=48)


def test_bad_settings_are_refused_with_the_argument_named() -> None:
    with pytest.raises(ValueError, match="budget 5 is smaller than the press's sinks \\+ window"):
        _evicting(StreamingLLMPress(sinks=4, window=2), budget=5)
    with pytest.raises(ValueError, match="budget 80 is larger than the capacity 64"):
        _evicting(H2OPress(), budget=80)
    with pytest.raises(TypeError, match="press must be a Press"):
        _evicting("h2o", budget=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window must be at least 1"):
        H2OPress(window=0)
    with pytest.raises(ValueError, match="kernel must be a positive odd int"):
        SnapKVPress(kernel=4)
    with pytest.raises(ValueError, match="max_step must be a positive int"):
        _evicting(H2OPress(), budget=8, max_step=0)
    cache = _evicting(H2OPress(), budget=12, max_step=8)
    with pytest.raises(ValueError, match="9 tokens in one forward exceed the 8"):
        forward(_model(), _tokens()[:, :9], cache=cache, fresh_cache=True)
    with pytest.raises(ValueError, match="scores keys does not serve skip_layers"):
        forward(_model(), _tokens()[:, :4], cache=cache, skip_layers=(0,))


def test_windowed_layers_are_masked_per_head() -> None:
    """On an all-windowed model (window 4), a press whose recent window (8) covers the
    model's keeps every key a query can see: equal to the dense cache past the budget.
    H2O, which may evict inside the window, stays finite."""
    model = tiny_model(head_dim=16, sliding_window=4, sliding_layers=(True, True), max_position_embeddings=128)
    tokens = _tokens(3)
    dense, _ = run_in_chunks(model, DenseKVCache.for_model(model.config, 2, 64), tokens, CHUNKS)
    cache = EvictingKVCache.for_model(model.config, 2, 64, press=StreamingLLMPress(sinks=2, window=8), budget=12,
                                      max_step=8)
    logits, cache = run_in_chunks(model, cache, tokens, CHUNKS)
    np.testing.assert_allclose(logits, dense, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [34, 34] and (np.asarray(cache.held) == 13).all()
    cache = EvictingKVCache.for_model(model.config, 2, 64, press=H2OPress(window=2), budget=12, max_step=8)
    logits, _ = run_in_chunks(model, cache, tokens, CHUNKS)
    assert np.isfinite(logits).all()


def test_a_model_with_two_layer_kinds_scores_through_each_kinds_branch() -> None:
    """Gemma 3's local and global layers (a `lax.switch` per layer) both hand their attention
    mass to the cache: equal to dense while the rows fit."""
    from cache.test_hybrid_cache import gemma3

    model, tokens = gemma3(), _tokens(4)
    dense, _ = run_in_chunks(model, DenseKVCache.for_model(model.config, 2, 64), tokens, CHUNKS)
    cache = EvictingKVCache.for_model(model.config, 2, 64, press=H2OPress(window=2), budget=40, max_step=8)
    logits, cache = run_in_chunks(model, cache, tokens, CHUNKS)
    np.testing.assert_allclose(logits, dense, rtol=1e-5, atol=1e-5)
    assert float(np.asarray(cache.scores).sum()) > 0  # statistics arrived
