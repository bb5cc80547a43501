"""PagedKVCache equals the dense cache (prefill, chunks, ragged rows, rollback, tree
commits, both generation loops) for page sizes 8/16/64 with lengths off page
multiples; prefix sharing counts shared pages once and copies on write; every page
not in use is NaN, so a stray read through the page table fails."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.speculative import RAGGED_PROMPTS, OracleDrafter, greedy_future
from helpers.tiny import tiny_model

from efficient.cache import DenseKVCache
from efficient.cache.paged import NO_PAGE, PagedKVCache
from efficient.decoding import generate
from efficient.decoding.speculative import speculative_generate
from efficient.models import jit_forward

TOL = dict(rtol=1e-5, atol=1e-5)


@functools.cache
def _step():  # noqa: ANN202
    return jit_forward(tiny_model())


def _tokens(seed: int, b: int = 2, t: int = 30) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(1, 61, size=(b, t)), jnp.int32)


def _poison_free_pages(cache: PagedKVCache) -> PagedKVCache:
    """NaN in every pool page no row maps: reading one would poison the logits."""
    free = (cache.refcounts == 0)[None, :, None, None, None]
    nan = jnp.asarray(np.nan, cache.k_pages.dtype)
    return PagedKVCache(**{**cache.__dict__, "k_pages": jnp.where(free, nan, cache.k_pages),
                           "v_pages": jnp.where(free, nan, cache.v_pages)})


def _run(cache, tokens: jax.Array, chunks: list[int], poison: bool = False) -> tuple[np.ndarray, object]:  # noqa: ANN001
    out, at = [], 0
    for size in chunks:
        if poison:
            cache = _poison_free_pages(cache)
        logits, cache = _step()(tokens[:, at:at + size], cache=cache)
        out.append(np.asarray(logits))
        at += size
    return np.concatenate(out, axis=1), cache


@pytest.mark.parametrize("page_size", [8, 16, 64])
def test_prefill_and_decode_equal_dense_with_nan_in_unused_pages(page_size: int) -> None:
    tokens = _tokens(0)
    chunks = [13, 1, 3, 1, 3, 3, 6]  # 30 tokens: lengths off page multiples
    config = tiny_model().config
    want, _ = _run(DenseKVCache.for_model(config, 2, 64), tokens, chunks)
    got, cache = _run(PagedKVCache.for_model(config, 2, 64, page_size=page_size), tokens, chunks, poison=True)
    np.testing.assert_allclose(got, want, **TOL)
    assert int(cache.pages_in_use()) == 2 * -(-30 // page_size)
    assert not bool(cache.exhausted)


def test_rollback_releases_pages_and_stays_equal_to_dense() -> None:
    config = tiny_model().config
    tokens = _tokens(1)
    dense = DenseKVCache.for_model(config, 2, 64)
    paged = PagedKVCache.for_model(config, 2, 64, page_size=8)
    _, dense = _run(dense, tokens, [13, 6, 1])
    _, paged = _run(paged, tokens, [13, 6, 1])
    assert int(paged.pages_in_use()) == 6
    lengths = jnp.asarray([7, 16], jnp.int32)  # row 0 back inside its first page, row 1 on a boundary
    dense, paged = dense.truncate(lengths), paged.truncate(lengths)
    assert int(paged.pages_in_use()) == 1 + 2
    # Different continuations per row after the rollback, through freed and reused pages.
    cont = _tokens(2, t=10)
    want, _ = _run(dense, cont, [3, 1, 6])
    got, paged = _run(paged, cont, [3, 1, 6], poison=True)
    np.testing.assert_allclose(got, want, **TOL)


def test_select_moves_a_tree_path_across_page_boundaries() -> None:
    config = tiny_model().config
    dense = DenseKVCache.for_model(config, 2, 64)
    paged = PagedKVCache.for_model(config, 2, 64, page_size=8)
    tokens = _tokens(3, t=14)
    _, dense = _run(dense, tokens, [6, 6, 1, 1])
    _, paged = _run(paged, tokens, [6, 6, 1, 1])
    source = jnp.asarray([[7, 9, 13], [6, 12, 0]], jnp.int32)  # slots 6..13 were the last forward's
    counts, start = jnp.asarray([3, 2], jnp.int32), jnp.asarray([6, 6], jnp.int32)
    dense, paged = dense.select(source, counts, start), paged.select(source, counts, start)
    np.testing.assert_array_equal(paged.lengths, dense.lengths)
    cont = _tokens(4, t=3)
    want, _ = _run(dense, cont, [3])
    got, _ = _run(paged, cont, [3], poison=True)
    np.testing.assert_allclose(got, want, **TOL)


def _paged_factory(page_size: int):  # noqa: ANN202
    return functools.partial(PagedKVCache.for_model, page_size=page_size)


@pytest.mark.parametrize("page_size", [8, 16])
def test_generate_and_tree_speculation_on_pages_equal_dense_greedy(page_size: int) -> None:
    model = tiny_model()
    want = generate(model, RAGGED_PROMPTS, max_new_tokens=12)
    got = generate(model, RAGGED_PROMPTS, max_new_tokens=12, cache=_paged_factory(page_size))
    assert got.sequences() == want.sequences()
    drafter = OracleDrafter(future=greedy_future(model, RAGGED_PROMPTS, 12), tree=True)
    spec = speculative_generate(model, RAGGED_PROMPTS, drafter=drafter, max_new_tokens=12,
                                cache=_paged_factory(page_size))
    assert spec.sequences() == want.sequences()


def test_forked_rows_share_the_prefix_once_and_copy_on_write() -> None:
    config = tiny_model().config
    prefix, suffix = _tokens(5, b=1, t=19), _tokens(6, b=3, t=6)
    # Dense: every row prefills prefix + its own suffix.
    dense = DenseKVCache.for_model(config, 3, 32)
    want, _ = _run(dense, jnp.concatenate([jnp.repeat(prefix, 3, 0), suffix], axis=1), [19, 6])
    # Paged: the prefix once in a one-row cache whose pool has room for three rows, then three forks.
    one = PagedKVCache.for_model(config, 1, 32, page_size=8, num_pages=12)
    _, one = _run(one, prefix, [19])
    shared = one.fork(jnp.zeros((3,), jnp.int32))
    assert int(shared.pages_in_use()) == 3  # 19 tokens: three pages, counted once
    np.testing.assert_array_equal(shared.refcounts[shared.page_table[0, :3]], [3, 3, 3])
    got, shared = _run(shared, suffix, [6], poison=True)
    np.testing.assert_allclose(got[:, -6:], want[:, -6:], **TOL)
    # Each row copied the partial third page on its first write and took one more: the
    # two full prefix pages stay shared; the original third page is free again.
    assert int(shared.pages_in_use()) == 2 + 3 * 2
    np.testing.assert_array_equal(shared.page_table[:, :2], np.repeat(np.asarray(one.page_table[:, :2]), 3, 0))
    assert shared.used_nbytes() < DenseKVCache.for_model(config, 3, 32).nbytes()


def test_an_exhausted_pool_sets_the_flag_instead_of_losing_tokens_silently() -> None:
    config = tiny_model().config
    cache = PagedKVCache.for_model(config, 2, 64, page_size=8, num_pages=8, oversubscribe=True)
    _, cache = _run(cache, _tokens(7, t=39), [13, 13, 13])  # needs 2 x 5 pages
    assert bool(cache.exhausted)
    assert int(cache.pages_in_use()) == 8


def test_page_table_entries_are_unmapped_after_release() -> None:
    config = tiny_model().config
    cache = PagedKVCache.for_model(config, 2, 64, page_size=8)
    _, cache = _run(cache, _tokens(8, t=13), [13])
    cache = cache.truncate(jnp.zeros((2,), jnp.int32))
    assert int(cache.pages_in_use()) == 0
    assert np.all(np.asarray(cache.page_table) == NO_PAGE)


@pytest.mark.parametrize("kwargs, match", [
    (dict(capacity=30, page_size=8), "page_size=8 must divide capacity=30"),
    (dict(capacity=32, page_size=8, num_pages=7), "num_pages=7 is too small for the batch"),
    (dict(capacity=32, page_size=8, num_pages=3, oversubscribe=True), "num_pages=3 cannot hold one row"),
    (dict(capacity=32, page_size=0), "page_size must be a positive int"),
])
def test_bad_settings_are_refused_with_the_argument_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PagedKVCache.init(num_layers=2, batch_size=2, num_kv_heads=2, head_dim=8, **kwargs)
