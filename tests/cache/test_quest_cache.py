"""Quest (Tang et al. 2024): the page bounds are true upper bounds and stay exact through
chunks, rollback and tree commits; the selection is the one the rule names on hand-built
keys; attention over a `QuestView` equals the oracle restricted to the selected pages
(NaN past each row's length changes nothing); at full density the cache equals the dense
one (logits, greedy and speculative tokens); empty rows give no NaN; bad settings are refused."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.speculative import OracleDrafter, greedy_future
from helpers.tiny import run_in_chunks, tiny_model

from efficient.attention import attention
from efficient.attention.page_select import (
    QuestView,
    attention_mass_kept,
    gather_pages,
    logit_bounds,
    page_bounds,
    page_scores,
    select_pages,
)
from efficient.attention.views import DenseView
from efficient.cache import DenseKVCache, QuestKVCache
from efficient.decoding import generate
from efficient.decoding.speculative import speculative_generate
from efficient.models import unstack_layers

P = 8


@functools.cache
def _model():  # noqa: ANN202
    return tiny_model(head_dim=16)


def _quest(fraction: float, b: int = 2, capacity: int = 64, dense_layers: tuple[int, ...] = ()) -> QuestKVCache:
    return QuestKVCache.for_model(_model().config, b, capacity, page_size=P, page_fraction=fraction,
                                  max_queries=P, dense_layers=dense_layers)


def _tokens(seed: int, b: int = 2, t: int = 56) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(1, 61, size=(b, t)), jnp.int32)


CHUNKS = [20, 1, 3, 1, 1, 8, 2, 12, 8]  # 56 tokens: prefill chunks (dense) and steps of <= P (selecting)


def _view(b: int = 2, kh: int = 2, s: int = 64, h: int = 16, lengths=(61, 30), top: int = 3, seed: int = 0,
          nan_past: bool = True) -> QuestView:
    rng = np.random.default_rng(seed)
    k, v = (rng.standard_normal((b, kh, s, h)).astype(np.float32) for _ in range(2))
    lengths = np.asarray(lengths, np.int32)
    dead = np.arange(s)[None, :] >= lengths[:, None]
    if nan_past:  # what a slot past the row's length holds must not matter
        k[np.broadcast_to(dead[:, None], k.shape[:3])] = np.nan
        v[np.broadcast_to(dead[:, None], v.shape[:3])] = np.nan
    positions = np.where(dead, -1, np.arange(s)[None, :]).astype(np.int32)
    lo, hi = page_bounds(jnp.asarray(k), jnp.asarray(~dead), P)
    return QuestView(k=jnp.asarray(k), v=jnp.asarray(v), positions=jnp.asarray(positions),
                     lengths=jnp.asarray(lengths), page_min=lo, page_max=hi, page_size=P, top_pages=top,
                     max_queries=P)


def _oracle(q: jax.Array, view: QuestView, pages: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The float32 oracle over the whole cache with every slot outside the selected pages hidden,
    one KV head at a time."""
    b, t, n, _ = q.shape
    kh, g = view.num_kv_heads, n // view.num_kv_heads
    lengths = np.asarray(view.lengths)
    outs = []
    for head in range(kh):
        chosen = np.zeros((b, view.num_slots), bool)
        for row in range(b):
            for page in pages[row, head]:
                chosen[row, page * P:(page + 1) * P] = True
        positions = np.where(chosen, np.asarray(view.positions), -1)
        live = positions >= 0
        k = jnp.where(live[:, None, :, None], view.k[:, head:head + 1], 0.0)
        v = jnp.where(live[:, None, :, None], view.v[:, head:head + 1], 0.0)
        q_positions = jnp.asarray(lengths[:, None] - t + np.arange(t)[None, :], jnp.int32)
        outs.append(attention(q[:, :, head * g:(head + 1) * g], DenseView(k=k, v=v, positions=jnp.asarray(positions),
                                                                          layout="BKSH"),
                              q_positions=q_positions, mask=None if mask is None else jnp.asarray(mask),
                              implementation="reference"))
    return np.asarray(jnp.concatenate(outs, axis=2))


# ------------------------------------------------------------------ bounds and selection


def test_page_bounds_bound_every_logit_of_their_page() -> None:
    view = _view(nan_past=False)
    q = jax.random.normal(jax.random.PRNGKey(1), (2, 1, 4, 16))
    bounds = np.asarray(logit_bounds(q, view, scale=1.0))  # B K T G Np
    scores = np.asarray(page_scores(q, view))  # B K Np
    logits = np.einsum("bkgh,bksh->bkgs", np.asarray(q[:, 0]).reshape(2, 2, 2, 16), np.asarray(view.k))
    lengths = np.asarray(view.lengths)
    for row in range(2):
        own = (lengths[row] - 1) // P
        for page in range(view.num_pages):
            live = [s for s in range(page * P, (page + 1) * P) if s < lengths[row]]
            for head in range(2):
                if not live:
                    assert scores[row, head, page] == -np.inf
                    continue
                assert scores[row, head, page] == (np.inf if page == own else scores[row, head, page])
                for g in range(2):  # a true upper bound, attained when one key holds every extreme
                    assert bounds[row, head, 0, g, page] >= logits[row, head, g, live].max() - 1e-5
    # the score is the bounded softmax weight summed over the group's query heads
    b = bounds[:, :, 0] * 16**-0.5
    live_pages = np.arange(view.num_pages)[None, :] * P < lengths[:, None]
    b = np.where(live_pages[:, None, None], b, -np.inf)
    weight = np.exp(b - b.max(axis=-1, keepdims=True)).sum(axis=2)
    finite = np.isfinite(scores)
    np.testing.assert_allclose(scores[finite], weight[finite], rtol=1e-5)


def test_the_selection_is_what_the_rule_names_on_hand_built_keys() -> None:
    b, kh, s, h = 1, 2, 64, 4
    k = np.zeros((b, kh, s, h), np.float32)
    k[0, 0, 2 * P + 3, 0] = 5.0  # head 0: page 2 holds the key aligned with q's first channel
    k[0, 0, 5 * P + 1, 1] = -4.0  # and page 5 the key anti-aligned with q's negative second channel
    k[0, 1, 1 * P, 2] = 3.0  # head 1: page 1
    k[0, 1, 4 * P, 2] = -3.0  # a large key of the wrong sign: a low bound
    v = np.ones_like(k)
    lengths = np.asarray([61], np.int32)
    positions = np.where(np.arange(s) < 61, np.arange(s), -1)[None].astype(np.int32)
    lo, hi = page_bounds(jnp.asarray(k), jnp.asarray(positions >= 0), P)
    view = QuestView(k=jnp.asarray(k), v=jnp.asarray(v), positions=jnp.asarray(positions),
                     lengths=jnp.asarray(lengths), page_min=lo, page_max=hi, page_size=P, top_pages=3, max_queries=P)
    q = np.zeros((1, 1, 2, h), np.float32)
    q[0, 0, 0] = [1.0, -1.0, 0.0, 0.0]
    q[0, 0, 1] = [0.0, 0.0, 1.0, 0.0]
    pages = np.asarray(select_pages(jnp.asarray(q), view))
    own = 60 // P  # the page of the query's own slot (60) is always read
    np.testing.assert_array_equal(pages[0, 0], sorted([2, 5, own]))
    assert set(pages[0, 1]) >= {1, own} and 4 not in pages[0, 1]


def test_sink_and_recent_pages_are_always_read() -> None:
    view = _view(nan_past=False, top=5)
    k = view.k.at[:, :, :P].set(0.0)  # page 0 bounds every logit by 0: the bound alone would not pick it
    lo, hi = page_bounds(k, view.positions >= 0, P)
    view = QuestView(**{**view.__dict__, "k": k, "page_min": lo, "page_max": hi})
    forced = QuestView(**{**view.__dict__, "sink_pages": 1, "recent_pages": 2})
    q = jax.random.normal(jax.random.PRNGKey(8), (2, 1, 4, 16))
    pages = np.asarray(select_pages(q, forced))
    for row, length in enumerate(np.asarray(view.lengths)):
        own = (length - 1) // P
        assert {0, own - 2, own - 1, own} <= set(pages[row, 0]) and {0, own - 1, own} <= set(pages[row, 1])
    free = np.asarray(select_pages(q, view))  # without them, the bound alone decides (row 1 has 4 live pages)
    assert all(0 not in free[0, h] for h in range(2))


def test_padding_queries_do_not_vote() -> None:
    view = _view(nan_past=False, top=2)
    q = jax.random.normal(jax.random.PRNGKey(2), (2, 2, 4, 16))
    padded = q.at[:, 1].set(1e3 * q[:, 1])  # a huge padding query would dominate the vote
    positions = jnp.asarray([[59, -1], [28, -1]], jnp.int32)
    want = select_pages(q[:, :1], view, positions[:, :1])
    got = select_pages(padded, view, positions)
    # the own pages are those of the last T slots either way (T=1 vs 2 moves nothing here)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ------------------------------------------------------------------ attention over the view


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("t", [1, 3])
def test_attention_over_the_selected_pages_equals_the_masked_oracle(implementation: str, t: int) -> None:
    view = _view(top=3)
    q = jax.random.normal(jax.random.PRNGKey(3), (2, t, 4, 16))
    pages = np.asarray(select_pages(q, view))
    got = np.asarray(attention(q, view, implementation=implementation))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _oracle(q, view, pages), rtol=2e-5, atol=2e-5)
    if t > 1:  # a tree mask over the S logical slots goes with the gathered pages
        rng = np.random.default_rng(4)
        mask = rng.random((2, t, view.num_slots)) < 0.7
        mask[:, :, :4] = True
        got = np.asarray(attention(q, view, mask=jnp.asarray(mask), implementation=implementation))
        np.testing.assert_allclose(got, _oracle(q, view, pages, mask), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_per_query_head_selection_reads_each_heads_own_pages(masked: bool) -> None:
    view = QuestView(**{**_view(top=3).__dict__, "per_query_head": True})
    t = 2
    q = jax.random.normal(jax.random.PRNGKey(9), (2, t, 4, 16))
    pages = np.asarray(select_pages(q, view))  # B N k
    assert pages.shape == (2, 4, 3)
    shared = np.asarray(select_pages(q, QuestView(**{**view.__dict__, "per_query_head": False})))
    assert not all(np.array_equal(pages[:, 2 * h], shared[:, h]) and np.array_equal(pages[:, 2 * h + 1], shared[:, h])
                   for h in range(2))  # the heads of a group disagree somewhere
    mask = np.random.default_rng(5).random((2, t, view.num_slots)) < 0.7 if masked else None
    if masked:
        mask[:, :, :4] = True
    got = np.asarray(attention(q, view, mask=None if mask is None else jnp.asarray(mask), implementation="xla"))
    lengths = np.asarray(view.lengths)
    for head in range(4):  # query head i over KV head i // 2, its own pages
        kv = head // 2
        chosen = np.zeros((2, view.num_slots), bool)
        for row in range(2):
            for page in pages[row, head]:
                chosen[row, page * P:(page + 1) * P] = True
        positions = np.where(chosen, np.asarray(view.positions), -1)
        live = positions >= 0
        k = jnp.where(live[:, None, :, None], view.k[:, kv:kv + 1], 0.0)
        v = jnp.where(live[:, None, :, None], view.v[:, kv:kv + 1], 0.0)
        want = attention(q[:, :, head:head + 1], DenseView(k=k, v=v, positions=jnp.asarray(positions), layout="BKSH"),
                         q_positions=jnp.asarray(lengths[:, None] - t + np.arange(t)[None, :], jnp.int32),
                         mask=None if mask is None else jnp.asarray(mask), implementation="reference")
        np.testing.assert_allclose(got[:, :, head:head + 1], np.asarray(want), rtol=2e-5, atol=2e-5)
    kept = np.asarray(attention_mass_kept(q, view))
    assert kept.shape == (2, 4, t) and (kept > 0).all() and (kept <= 1 + 1e-6).all() and (kept < 1 - 1e-4).any()


def test_full_density_long_calls_and_dense_layers_read_everything() -> None:
    q = jax.random.normal(jax.random.PRNGKey(5), (2, 1, 4, 16))
    full = _view(top=8, nan_past=False)
    dense = np.asarray(attention(q, full.dense(), implementation="reference"))
    np.testing.assert_allclose(np.asarray(attention(q, full, implementation="xla")), dense, rtol=2e-5, atol=2e-5)
    off = QuestView(**{**full.__dict__, "top_pages": 2, "sparse": False})
    np.testing.assert_allclose(np.asarray(attention(q, off, implementation="xla")), dense, rtol=2e-5, atol=2e-5)
    traced = jax.jit(lambda flag: attention(q, QuestView(**{**full.__dict__, "top_pages": 2, "sparse": flag}),
                                            implementation="xla"))
    np.testing.assert_allclose(np.asarray(traced(jnp.asarray(False))), dense, rtol=2e-5, atol=2e-5)
    assert np.abs(np.asarray(traced(jnp.asarray(True))) - dense).max() > 1e-3  # 2 of 8 pages: it selects
    long = jax.random.normal(jax.random.PRNGKey(6), (2, P + 1, 4, 16))  # more than max_queries: dense
    np.testing.assert_allclose(np.asarray(attention(long, off.__class__(**{**full.__dict__, "top_pages": 2}),
                                                    implementation="xla")),
                               np.asarray(attention(long, full.dense(), implementation="reference")),
                               rtol=2e-5, atol=2e-5)


def test_an_empty_row_gives_zeros_not_nan() -> None:
    view = _view(lengths=(0, 30), top=2)
    q = jax.random.normal(jax.random.PRNGKey(7), (2, 1, 4, 16))
    pages = select_pages(q, view)
    assert (np.asarray(gather_pages(view, pages).positions)[0] == -1).all()
    out = np.asarray(attention(q, view, q_positions=jnp.asarray([[0], [29]], jnp.int32), implementation="xla"))
    assert np.isfinite(out).all() and (out[0] == 0).all()


# ------------------------------------------------------------------ the cache


@functools.cache
def _run(kind: str) -> tuple[np.ndarray, object]:
    make = {"dense": lambda: DenseKVCache.for_model(_model().config, 2, 64),
            "full": lambda: _quest(1.0), "sparse": lambda: _quest(0.25)}[kind]
    return run_in_chunks(_model(), make(), _tokens(0), CHUNKS)


def _assert_bounds_exact(cache: QuestKVCache) -> None:
    for layer in range(cache.num_layers):
        view = cache.view(layer)
        lo, hi = page_bounds(view.k, cache._live(), P)
        live_page = np.asarray(jnp.arange(cache.capacity // P)[None] * P < cache.lengths[:, None])
        for got, want in ((view.page_min, lo), (view.page_max, hi)):
            got, want = np.asarray(got), np.asarray(want)
            np.testing.assert_array_equal(got[live_page[:, None].repeat(got.shape[1], 1)],
                                          want[live_page[:, None].repeat(want.shape[1], 1)])


def test_at_full_density_the_cache_equals_the_dense_one() -> None:
    dense, _ = _run("dense")
    full, cache = _run("full")
    np.testing.assert_allclose(full, dense, rtol=1e-5, atol=1e-5)
    _assert_bounds_exact(cache)


def test_sparse_steps_differ_from_dense_and_keep_exact_bounds_through_edits() -> None:
    dense, _ = _run("dense")
    sparse, cache = _run("sparse")
    prefill = CHUNKS[0]
    np.testing.assert_allclose(sparse[:, :prefill], dense[:, :prefill], rtol=1e-5, atol=1e-5)  # dense prefill
    assert np.isfinite(sparse).all() and np.abs(sparse[:, prefill:] - dense[:, prefill:]).max() > 1e-3
    _assert_bounds_exact(cache)
    edited = cache.select(jnp.asarray([[50, 53, 54]] * 2, jnp.int32), jnp.asarray([3, 1], jnp.int32),
                          jnp.asarray([41, 47], jnp.int32))
    _assert_bounds_exact(edited)
    rolled = edited.truncate(jnp.asarray([33, 20], jnp.int32))
    _, rolled = run_in_chunks(_model(), rolled, _tokens(1, t=3), [3])  # writes into the partial pages again
    _assert_bounds_exact(rolled)


def test_per_layer_buffers_equal_the_stacked_cache() -> None:
    want, stacked = _run("sparse")
    split = _quest(0.25).split_layers()
    assert split.per_layer and split.nbytes() == _quest(0.25).nbytes()
    got, split = run_in_chunks(unstack_layers(_model()), split, _tokens(0), CHUNKS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    back = split.stack_layers()
    np.testing.assert_array_equal(np.asarray(back.page_max), np.asarray(stacked.page_max))


def test_memory_is_the_dense_cache_plus_the_bounds() -> None:
    config = _model().config
    dense = DenseKVCache.for_model(config, 2, 64).nbytes()
    bounds = 2 * config.num_layers * 2 * config.num_kv_heads * (64 // P) * config.head_dim * 4
    assert _quest(0.25).nbytes() == dense + bounds


@pytest.mark.parametrize("tree", [False, True])
def test_speculative_decoding_at_full_density_equals_greedy(tree: bool) -> None:
    model = tiny_model()  # head_dim 8, 2 layers
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]

    def cache(config, batch, capacity, dtype=None):  # noqa: ANN001, ANN202
        return QuestKVCache.for_model(config, batch, capacity, dtype, page_size=16, page_fraction=1.0,
                                      dense_layers=())

    reference = generate(model, prompts, max_new_tokens=20)
    future = greedy_future(model, prompts, 20)
    drafter = OracleDrafter(future=future, length=4, tree=tree)
    out = speculative_generate(model, prompts, drafter=drafter, max_new_tokens=20, cache=cache)
    assert out.sequences() == reference.sequences()


def test_sparse_speculative_decoding_runs_without_nan() -> None:
    model = tiny_model()
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 4, [7, 8, 9]]

    def cache(config, batch, capacity, dtype=None):  # noqa: ANN001, ANN202
        return QuestKVCache.for_model(config, batch, capacity, dtype, page_size=16, page_fraction=0.25,
                                      dense_layers=())

    future = greedy_future(model, prompts, 16)
    out = speculative_generate(model, prompts, drafter=OracleDrafter(future=future, length=4, tree=True),
                               max_new_tokens=16, cache=cache)
    assert (np.asarray(out.lengths) == 16).all()


# ------------------------------------------------------------------ bad settings


@pytest.mark.parametrize("kwargs, match", [
    (dict(capacity=60), "page_size=8 must divide capacity=60"),
    (dict(max_queries=9), "max_queries=9 must be <= page_size=8"),
    (dict(dense_layers=(5,)), r"dense_layers=\(5,\)"),
    (dict(top_pages=0), "top_pages must be a positive int"),
    (dict(top_pages=3), "top_pages=3 must hold the 4 pages always read"),
    (dict(sink_pages=-1), "sink_pages must be an int >= 0"),
])
def test_bad_settings_are_refused(kwargs: dict, match: str) -> None:
    config = _model().config
    args = dict(num_layers=config.num_layers, batch_size=1, capacity=64, num_kv_heads=config.num_kv_heads,
                head_dim=config.head_dim, page_size=P, max_queries=P)
    with pytest.raises(ValueError, match=match):
        QuestKVCache.init(**{**args, **kwargs})


def test_bad_fraction_and_key_stats_are_refused() -> None:
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="page_fraction must be in"):
            QuestKVCache.for_model(_model().config, 1, 64, page_fraction=fraction)
    view = _view()
    with pytest.raises(ValueError, match="key_stats is not served over a QuestView"):
        attention(jnp.zeros((2, 1, 4, 16)), view, key_stats=True)
    with pytest.raises(ValueError, match="QuestView.page_min must have shape"):
        attention(jnp.zeros((2, 1, 4, 16)), QuestView(**{**view.__dict__, "page_min": view.page_min[:, :, :2]}))


def test_bfloat16_storage_keeps_float32_bounds_of_the_stored_keys() -> None:
    model = _model()
    dense = DenseKVCache.for_model(model.config, 2, 64, dtype="bfloat16")
    quest = QuestKVCache.for_model(model.config, 2, 64, dtype="bfloat16", page_size=P, page_fraction=1.0,
                                   max_queries=P, dense_layers=())
    want, _ = run_in_chunks(model, dense, _tokens(2, t=24), [16, 1, 3, 4])
    got, cache = run_in_chunks(model, quest, _tokens(2, t=24), [16, 1, 3, 4])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert cache.k.dtype == jnp.uint16 and cache.page_min.dtype == jnp.float32
    _assert_bounds_exact(cache)
    _, prefilled = run_in_chunks(model, DenseKVCache.for_model(model.config, 2, 64, dtype="bfloat16"),
                                 _tokens(2, t=24), [16, 1, 3, 4])
    converted = QuestKVCache.from_dense(prefilled, page_size=P, top_pages=4, max_queries=P, dense_layers=())
    np.testing.assert_array_equal(np.asarray(converted.page_max), np.asarray(cache.page_max))
