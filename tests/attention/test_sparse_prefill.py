"""MInference-style sparse prefill: every pattern at full budget equals dense (attention, a
model's forward, chunked prefill through a cache); each pattern lists the blocks its rule names
on hand-built inputs; sparse indexes (blocks and vertical columns) equal the oracle over the same
keys; no NaN on padding;
the search's allocation keeps its density budget; bad patterns and pattern files refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient.attention import AttentionSpec, DenseView, attention
from efficient.attention.sparse_prefill import (
    HeadPattern,
    SparsePrefill,
    set_sparse_prefill,
    sparse_layout,
    sparse_prefill_attention,
)
from efficient.attention.sparse_prefill_search import (
    allocate,
    causal_density,
    load_patterns,
    save_patterns,
    search_patterns,
)
from efficient.cache import DenseKVCache
from efficient.decoding import generate, speculative_generate
from efficient.decoding.drafters import PromptLookupDrafter
from efficient.models import forward
from tests.helpers.tiny import TINY, run_in_chunks, tiny_model

B, T, N, K, H = 2, 200, 4, 2, 16  # T: not a multiple of the 16-blocks (padded inside)
FULL = [HeadPattern("a_shape", 1.0), HeadPattern("vertical_slash", 1.0, 0.0), HeadPattern("vertical_slash", 0.0, 1.0),
        HeadPattern("block_sparse", 1.0), HeadPattern("dense")]


def _qkv(seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    make = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    positions[1, 150:] = -1  # a shorter row, right-padded
    return make(B, T, N, H), make(B, T, K, H), make(B, T, K, H), jnp.asarray(positions)


def _model() -> nnx.Module:
    """A private copy of the tiny model (set_sparse_prefill changes a model in place)."""
    return nnx.merge(*nnx.split(tiny_model()))


@pytest.mark.parametrize("pattern", FULL, ids=lambda p: f"{p.kind}-{p.budget}-{p.budget2}")
def test_every_pattern_at_full_budget_equals_dense_attention(pattern: HeadPattern) -> None:
    q, k, v, pos = _qkv()
    patterns = SparsePrefill.uniform(pattern, 1, N, block=16, min_tokens=1)
    got = sparse_prefill_attention(q, k, v, pos, pos, patterns, 0)
    want = attention(q, DenseView(k, v, pos), q_positions=pos, implementation="reference")
    real = np.asarray(pos >= 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=2e-5, atol=2e-5)


def test_sparse_indexes_equal_the_oracle_over_their_keys_and_no_nan() -> None:
    q, k, v, pos = _qkv(1)
    heads = (HeadPattern("a_shape", 0.05), HeadPattern("vertical_slash", 0.03, 0.03),
             HeadPattern("block_sparse", 0.1), HeadPattern("dense"))
    patterns = SparsePrefill(heads=(heads,), block=16, last_queries=16, min_tokens=1)
    indexes = []
    for spec in (AttentionSpec(), AttentionSpec(window=24, softcap=5.0)):
        got, index = sparse_prefill_attention(q, k, v, pos, pos, patterns, 0, spec=spec, return_index=True)
        want = sparse_prefill_attention(q, k, v, pos, pos, patterns, 0, spec=spec, implementation="reference")
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        indexes.append(index)
    padded = jnp.pad(pos, ((0, 0), (0, 8)), constant_values=-1)  # to 208, as inside
    density = np.asarray(causal_density(indexes[0], padded, padded)).mean(0)
    assert np.all(density[:3] < 1.0) and density[3] == 1.0  # each sparse head reads fewer keys than dense
    columns = np.asarray(indexes[0].columns)
    assert np.all(columns[:, 1] >= 0) and np.all(columns[:, [0, 2, 3]] == -1)  # only the vertical-slash head


def test_each_pattern_lists_the_blocks_its_rule_names() -> None:
    """One row, T = 128 in blocks of 16: queries attend to key 37 (a vertical line) and to the
    key 70 tokens back (a slash); A-shape and block-sparse lists checked block by block."""
    t, block = 128, 16
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    basis = np.eye(H, dtype=np.float32)
    k = np.zeros((1, t, 1, H), np.float32)
    q = np.zeros((1, t, 1, H), np.float32)
    k[0, 37, 0] = 30 * basis[0]  # every query that sees key 37 puts its mass there
    q[0, :, 0] = basis[0]
    kind = lambda name: jnp.asarray([["a_shape", "vertical_slash", "block_sparse"].index(name)])  # noqa: E731
    one = lambda x: jnp.asarray([x], jnp.float32)  # noqa: E731
    index = sparse_layout(jnp.asarray(q), jnp.asarray(k), pos, pos, kind("vertical_slash"), one(1 / t), one(0.0),
                          block=block, last_queries=16, max_budget=(1 / t, 0.0, 0.0))
    base = np.tril(np.ones((8, 8), bool)) & (np.eye(8, dtype=bool) | np.eye(8, k=-1, dtype=bool))
    base[:, 0] = True
    base[7] = True  # the block of the last 16 queries attends densely
    np.testing.assert_array_equal(np.asarray(index.layout.block_mask(t // block))[0, 0], base)
    np.testing.assert_array_equal(np.asarray(index.columns)[0, 0], [37])  # the vertical line, token-wise

    # A slash: every query attends 70 tokens back. Rotations at H / 2 frequencies (as RoPE):
    # q_i . k_j = 5 * sum_f cos(theta_f (i - j - 70)), largest at distance 70 only.
    theta = 2.0 ** -np.arange(H // 2)
    angle_q, angle_k = np.arange(t)[:, None] * theta, (np.arange(t)[:, None] + 70) * theta
    q2 = 5 * np.concatenate([np.cos(angle_q), np.sin(angle_q)], -1)[None, :, None].astype(np.float32)
    k2 = np.concatenate([np.cos(angle_k), np.sin(angle_k)], -1)[None, :, None].astype(np.float32)
    index = sparse_layout(jnp.asarray(q2), jnp.asarray(k2), pos, pos, kind("vertical_slash"), one(0.0),
                          one(1 / t), block=block, last_queries=16, max_budget=(0.0, 1 / t, 0.0))
    listed = np.asarray(index.layout.block_mask(t // block))[0, 0]
    want = base.copy()
    for i in range(8):  # the keys 70 back from query block i: positions 16i - 70 .. 16i + 15 - 70
        for j in range(8):
            if 16 * j <= 16 * i + 15 - 70 and 16 * j + 15 >= 16 * i - 70:
                want[i, j] = True
    np.testing.assert_array_equal(listed, want)

    # A-shape with a 40-token window: blocks holding a key within 40 before the block's first query.
    index = sparse_layout(jnp.asarray(q), jnp.asarray(k), pos, pos, kind("a_shape"), one(40 / t), one(0.0),
                          block=block, last_queries=16)
    listed = np.asarray(index.layout.block_mask(t // block))[0, 0]
    near = 16 * np.arange(8)[None, :] + 15 >= 16 * np.arange(8)[:, None] - 40
    want = base | (np.tril(np.ones((8, 8), bool)) & near)
    np.testing.assert_array_equal(listed, want)

    # Block-sparse, one block per query block: the pooled score favours block 2 (key 37).
    index = sparse_layout(jnp.asarray(q), jnp.asarray(k), pos, pos, kind("block_sparse"), one(1 / 8), one(0.0),
                          block=block, last_queries=16, max_budget=(0.0, 0.0, 1 / 8))
    listed = np.asarray(index.layout.block_mask(t // block))[0, 0]
    want = base.copy()
    want[2:, 2] = True
    np.testing.assert_array_equal(listed, want)


def test_a_model_prefills_with_full_budget_patterns_as_densely_and_chunks_through_the_cache() -> None:
    model = _model()
    tokens = jnp.asarray(np.random.default_rng(3).integers(1, TINY.vocab_size, (2, 40)), jnp.int32)
    want, _ = forward(model, tokens)
    heads = tuple(FULL[:4])
    set_sparse_prefill(model, SparsePrefill(heads=(heads, heads), block=16, min_tokens=8))
    got, _ = forward(model, tokens)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    chunked, _ = run_in_chunks(model, DenseKVCache.for_model(TINY, 2, 48), tokens, [24, 16])
    np.testing.assert_allclose(chunked, want, rtol=2e-5, atol=2e-5)
    sparse = (HeadPattern("a_shape", 0.05),) * 4
    set_sparse_prefill(model, SparsePrefill(heads=(sparse, sparse), block=8, last_queries=8, min_tokens=8))
    got, _ = forward(model, tokens)
    assert np.all(np.isfinite(got)) and np.abs(np.asarray(got) - np.asarray(want)).max() > 1e-3  # really sparse


def test_speculative_decoding_on_a_sparse_prefill_model_equals_its_generate() -> None:
    model = _model()
    heads = (HeadPattern("vertical_slash", 0.1, 0.1),) * 4
    set_sparse_prefill(model, SparsePrefill(heads=(heads, heads), block=8, last_queries=8, min_tokens=16))
    prompt = [list(np.random.default_rng(4).integers(1, TINY.vocab_size, 32))]
    plain = generate(model, prompt, max_new_tokens=8)
    drafter = PromptLookupDrafter.create(length=3, max_ngram=2)
    spec = speculative_generate(model, prompt, drafter=drafter, max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(plain.tokens))


def test_allocation_spends_the_density_budget_where_recall_gains_most() -> None:
    recall = np.array([[0.5, 0.9, 1.0], [0.9, 0.95, 1.0]])
    density = np.array([[0.1, 0.2, 1.0], [0.1, 0.2, 1.0]])
    np.testing.assert_array_equal(allocate(recall, density, 0.15), [1, 0])  # +0.4 beats +0.05
    np.testing.assert_array_equal(allocate(recall, density, 0.2), [1, 1])
    np.testing.assert_array_equal(allocate(recall, density, 1.0), [2, 2])


def test_search_meets_its_density_and_pattern_files_round_trip(tmp_path) -> None:  # noqa: ANN001
    model = _model()
    tokens = jnp.asarray(np.random.default_rng(5).integers(1, TINY.vocab_size, (1, 128)), jnp.int32)
    patterns, found = search_patterns(model, tokens, 0.75, block=16, last_queries=16, min_tokens=16)
    assert (patterns.num_layers, patterns.num_heads) == (TINY.num_layers, TINY.num_heads)
    assert found.density.mean() <= 0.75 + 1e-6 and np.all((found.recall > 0) & (found.recall <= 1 + 1e-5))
    path = save_patterns(tmp_path / "p.json", patterns, TINY)
    assert load_patterns(path, TINY) == patterns
    with pytest.raises(ValueError, match="num_heads"):
        load_patterns(path, TINY.replace(num_heads=8, num_kv_heads=4))
    with pytest.raises(ValueError, match="density"):
        search_patterns(model, tokens, 1.5)


@pytest.mark.parametrize("make, match", [
    (lambda: HeadPattern("diagonal", 0.1), "kind"),
    (lambda: HeadPattern("a_shape", 1.5), "budget"),
    (lambda: HeadPattern("block_sparse", 0.0), "positive budget"),
    (lambda: SparsePrefill(heads=((HeadPattern("dense"),),), block=0), "block"),
    (lambda: SparsePrefill(heads=((HeadPattern("dense"),), ())), "non-empty"),
    (lambda: set_sparse_prefill(_model(), SparsePrefill.uniform(HeadPattern("dense"), 3, 4)), "another model"),
])
def test_bad_patterns_are_refused(make, match: str) -> None:  # noqa: ANN001
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_slash_sums_by_shear_equal_the_general_scatter() -> None:
    from efficient.attention.sparse_prefill import _slash_by_scatter, _slash_by_shear

    m, s = 8, 40
    qp = jnp.asarray([[30 - i for i in range(m)], [5, 4, 3, 2, 1, 0, -1, -1]], jnp.int32)  # row 1: a short prompt
    kp = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (2, s))
    probs = jnp.asarray(np.random.default_rng(6).random((2, 3, m, s)), jnp.float32)
    probs = jnp.where((kp[:, None, None, :] <= qp[:, None, :, None]) & (qp[:, None, :, None] >= 0), probs, 0.0)
    np.testing.assert_allclose(_slash_by_shear(probs, qp, kp), _slash_by_scatter(probs, qp, kp), atol=1e-6)
