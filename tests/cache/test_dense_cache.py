"""DenseKVCache: the cache protocol, and the lossless decode invariant on a tiny Llama."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient.attention import DenseView
from efficient.cache import DenseKVCache, KVCache, KVView
from efficient.models import LlamaModel, ModelConfig, forward

L, B, S, K, H = 2, 3, 8, 2, 4


def _empty(capacity: int = S, dtype=jnp.float32) -> DenseKVCache:
    return DenseKVCache.init(num_layers=L, batch_size=B, capacity=capacity, num_kv_heads=K,
                             head_dim=H, dtype=dtype)


def _logical(x: jax.Array) -> np.ndarray:
    """Stored [..., K, S, H] -> the logical [..., S, K, H] order."""
    return np.swapaxes(np.asarray(x), -2, -3)


def _kv(seed: int, t: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(B, t, K, H)), jnp.float32),
            jnp.asarray(rng.normal(size=(B, t, K, H)), jnp.float32))


def _filled(lengths: list[int], capacity: int = S) -> tuple[DenseKVCache, np.ndarray, np.ndarray]:
    """A cache whose row b holds lengths[b] tokens at positions 0.. (all layers written).

    Returns the cache and the k, v written ([L, B, T, K, H], T = max(lengths)).
    """
    t = max(lengths)
    cache = _empty(capacity)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t))
    cache, slots = cache.reserve(positions)
    ks, vs = [], []
    for layer in range(L):
        k, v = _kv(100 + layer, t)
        cache = cache.update(layer, k, v, slots)
        ks.append(np.asarray(k))
        vs.append(np.asarray(v))
    cache = cache.truncate(jnp.asarray(lengths, jnp.int32))
    return cache, np.stack(ks), np.stack(vs)


# ------------------------------------------------------------------ init


def test_init_shapes_and_dtypes() -> None:
    cache = _empty(dtype=jnp.bfloat16)
    assert cache.k.shape == cache.v.shape == (L, B, K, S, H)  # the decode kernel's layout
    assert cache.capacity == S
    assert cache.dtype == jnp.bfloat16 and cache.view(0).k.dtype == cache.view(0).v.dtype == jnp.bfloat16
    assert cache.k.dtype == jnp.uint16  # 16-bit floats are stored as bit patterns (in-place scatter on CPU)
    assert cache.positions.shape == (B, S) and cache.positions.dtype == jnp.int32
    assert cache.lengths.shape == (B,) and cache.lengths.dtype == jnp.int32
    assert np.all(np.asarray(cache.positions) == -1)
    assert np.all(np.asarray(cache.lengths) == 0)
    assert cache.capacity == S and cache.batch_size == B
    assert isinstance(cache, KVCache)


def test_for_model_uses_config() -> None:
    cfg = _config()
    cache = DenseKVCache.for_model(cfg, batch_size=2, capacity=5)
    assert cache.k.shape == (cfg.num_layers, 2, cfg.num_kv_heads, 5, cfg.head_dim)
    assert cache.k.dtype == cache.dtype == jnp.float32
    assert DenseKVCache.for_model(cfg, 2, 5, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    assert DenseKVCache.for_model(cfg.replace(dtype="bfloat16"), 2, 5).view(0).k.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["num_layers", "batch_size", "capacity", "num_kv_heads", "head_dim"])
@pytest.mark.parametrize("bad", [0, -2, 2.0, "4"])
def test_init_rejects_bad_args(name: str, bad) -> None:
    args = dict(num_layers=L, batch_size=B, capacity=S, num_kv_heads=K, head_dim=H)
    args[name] = bad
    with pytest.raises(ValueError, match=name):
        DenseKVCache.init(**args)


# ------------------------------------------------------------------ reserve / update / view


def test_reserve_assigns_next_slots_and_records_positions() -> None:
    cache = _empty()
    pos = jnp.asarray([[0, 1, 2], [-1, 0, 1], [0, 1, 2]], jnp.int32)  # row 1 left-padded
    cache, slots = cache.reserve(pos)
    np.testing.assert_array_equal(np.asarray(slots), np.broadcast_to(np.arange(3), (B, 3)))
    np.testing.assert_array_equal(np.asarray(cache.lengths), [3, 3, 3])
    want = np.full((B, S), -1)
    want[:, :3] = np.asarray(pos)
    np.testing.assert_array_equal(np.asarray(cache.positions), want)
    cache, slots = cache.reserve(jnp.asarray([[3, 4], [2, 3], [3, 4]], jnp.int32))
    np.testing.assert_array_equal(np.asarray(slots), np.broadcast_to([3, 4], (B, 2)))
    np.testing.assert_array_equal(np.asarray(cache.lengths), [5, 5, 5])
    np.testing.assert_array_equal(np.asarray(cache.positions)[1, :6], [-1, 0, 1, 2, 3, -1])


def test_reserve_on_ragged_rows() -> None:
    cache, _, _ = _filled([5, 2, 0])
    cache, slots = cache.reserve(cache.next_positions(2))
    np.testing.assert_array_equal(np.asarray(slots), [[5, 6], [2, 3], [0, 1]])
    np.testing.assert_array_equal(np.asarray(cache.lengths), [7, 4, 2])
    np.testing.assert_array_equal(
        np.asarray(cache.positions),
        [[0, 1, 2, 3, 4, 5, 6, -1], [0, 1, 2, 3, -1, -1, -1, -1], [0, 1, -1, -1, -1, -1, -1, -1]],
    )


def test_update_view_round_trip_per_layer() -> None:
    cache = _empty()
    cache, slots = cache.reserve(jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (B, 3)))
    k0, v0 = _kv(1, 3)
    cache = cache.update(0, k0, v0, slots)
    view0, view1 = cache.view(0), cache.view(1)
    assert isinstance(view0, KVView) and isinstance(view0, DenseView)
    assert view0.layout == "BKSH" and view0.k.shape == (B, K, S, H) and view0.num_slots == S
    np.testing.assert_array_equal(np.asarray(view0.lengths), np.asarray(cache.lengths))
    np.testing.assert_array_equal(_logical(view0.k)[:, :3], np.asarray(k0))
    np.testing.assert_array_equal(_logical(view0.v)[:, :3], np.asarray(v0))
    assert np.all(_logical(view0.k)[:, 3:] == 0)
    assert np.all(np.asarray(view1.k) == 0) and np.all(np.asarray(view1.v) == 0)  # other layer untouched
    np.testing.assert_array_equal(np.asarray(view0.positions), np.asarray(cache.positions))

    # ragged second write: each row's tokens land at its own slots
    cache = cache.truncate(jnp.asarray([3, 1, 2], jnp.int32))
    cache, slots = cache.reserve(cache.next_positions(2))
    k1, v1 = _kv(2, 2)
    cache = cache.update(1, k1, v1, slots)
    view1 = cache.view(1)
    for b, start in enumerate([3, 1, 2]):
        np.testing.assert_array_equal(_logical(view1.k)[b, start:start + 2], np.asarray(k1)[b])
        np.testing.assert_array_equal(_logical(view1.v)[b, start:start + 2], np.asarray(v1)[b])
    np.testing.assert_array_equal(_logical(cache.view(0).k)[:, :3], np.asarray(k0))


def test_update_casts_to_cache_dtype() -> None:
    cache = _empty(dtype=jnp.bfloat16)
    cache, slots = cache.reserve(jnp.zeros((B, 1), jnp.int32))
    k, v = _kv(3, 1)
    cache = cache.update(0, k, v, slots)
    assert cache.dtype == cache.view(0).k.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_logical(cache.view(0).k)[:, :1], np.asarray(k.astype(jnp.bfloat16)))


# ------------------------------------------------------------------ next_positions / truncate


def test_next_positions() -> None:
    empty = _empty()
    np.testing.assert_array_equal(np.asarray(empty.next_positions(3)), np.broadcast_to(np.arange(3), (B, 3)))
    cache, _, _ = _filled([4, 1, 0])
    np.testing.assert_array_equal(np.asarray(cache.next_positions(2)), [[4, 5], [1, 2], [0, 1]])
    # left padding (-1 positions) does not count
    padded, _ = empty.reserve(jnp.asarray([[-1, -1, 0], [-1, 0, 1], [0, 1, 2]], jnp.int32))
    np.testing.assert_array_equal(np.asarray(padded.next_positions(1)), [[1], [2], [3]])


def test_truncate_rolls_back_and_never_grows() -> None:
    cache, _, _ = _filled([6, 4, 3])
    cut = cache.truncate(jnp.asarray([2, 4, 0], jnp.int32))
    np.testing.assert_array_equal(np.asarray(cut.lengths), [2, 4, 0])
    want = np.full((B, S), -1)
    want[0, :2] = [0, 1]
    want[1, :4] = [0, 1, 2, 3]
    np.testing.assert_array_equal(np.asarray(cut.positions), want)
    grown = cut.truncate(jnp.asarray([5, 8, 1], jnp.int32))
    np.testing.assert_array_equal(np.asarray(grown.lengths), [2, 4, 0])
    np.testing.assert_array_equal(np.asarray(grown.positions), want)
    np.testing.assert_array_equal(np.asarray(cut.next_positions(1)), [[2], [4], [0]])


# ------------------------------------------------------------------ select


def test_select_compacts_accepted_slots_per_row() -> None:
    cache, ks, vs = _filled([7, 7, 5])
    # tree positions of the speculative slots 3..6: node 3 at depth 3, nodes 4 and 5
    # its children (position 4), node 6 a child of 5 (position 5)
    tree_pos = jnp.asarray([[0, 1, 2, 3, 4, 4, 5, -1]] * B, jnp.int32)
    cache = dataclasses.replace(cache, positions=jnp.where(cache.positions >= 0, tree_pos, -1))
    source = jnp.asarray([[3, 5, 6], [4, 0, 0], [1, 2, 0]], jnp.int32)
    counts = jnp.asarray([3, 1, 0], jnp.int32)
    start = jnp.asarray([3, 3, 4], jnp.int32)
    out = cache.select(source, counts, start)
    np.testing.assert_array_equal(np.asarray(out.lengths), [6, 4, 4])
    np.testing.assert_array_equal(
        np.asarray(out.positions),
        [[0, 1, 2, 3, 4, 5, -1, -1], [0, 1, 2, 4, -1, -1, -1, -1], [0, 1, 2, 3, -1, -1, -1, -1]],
    )
    k, v = _logical(out.k), _logical(out.v)
    # row 0: slots 0..2 unchanged, slots 3..5 hold old 3, 5, 6 (every layer)
    np.testing.assert_array_equal(k[:, 0, :3], ks[:, 0, :3])
    np.testing.assert_array_equal(k[:, 0, 3:6], ks[:, 0, [3, 5, 6]])
    np.testing.assert_array_equal(v[:, 0, 3:6], vs[:, 0, [3, 5, 6]])
    # row 1: slot 3 holds old slot 4
    np.testing.assert_array_equal(k[:, 1, :3], ks[:, 1, :3])
    np.testing.assert_array_equal(k[:, 1, 3], ks[:, 1, 4])
    np.testing.assert_array_equal(v[:, 1, 3], vs[:, 1, 4])
    # row 2: nothing accepted, just rolled back to start; its first slots untouched
    np.testing.assert_array_equal(k[:, 2, :4], ks[:, 2, :4])
    np.testing.assert_array_equal(np.asarray(out.next_positions(1)), [[6], [5], [4]])


# ------------------------------------------------------------------ nbytes / pytree


def test_nbytes_is_sum_of_arrays_and_scales_with_capacity() -> None:
    for dtype, itemsize in ((jnp.float32, 4), (jnp.bfloat16, 2)):
        small, big = _empty(8, dtype), _empty(24, dtype)
        for cache, cap in ((small, 8), (big, 24)):
            arrays = cache.k.nbytes + cache.v.nbytes + cache.positions.nbytes + cache.lengths.nbytes
            assert cache.nbytes() == arrays
            assert cache.nbytes() == 2 * L * B * cap * K * H * itemsize + B * cap * 4 + B * 4
        per_slot = 2 * L * B * K * H * itemsize + B * 4
        assert big.nbytes() - small.nbytes() == 16 * per_slot


def test_cache_is_a_pytree() -> None:
    cache, _, _ = _filled([3, 1, 2])
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    assert len(leaves) == 4
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(back, DenseKVCache)
    for a, b in zip(jax.tree_util.tree_leaves(back), leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    doubled = jax.tree_util.tree_map(lambda x: x * 2, cache)
    np.testing.assert_array_equal(np.asarray(doubled.lengths), [6, 2, 4])


def test_works_through_jit_with_donation() -> None:
    cache, ks, _ = _filled([3, 1, 2])
    expected_k0 = _logical(cache.k[0]).copy()

    @functools.partial(jax.jit, donate_argnums=0)
    def step(cache: DenseKVCache, k: jax.Array, v: jax.Array, lengths: jax.Array) -> DenseKVCache:
        cache = cache.truncate(lengths)
        cache, slots = cache.reserve(cache.next_positions(k.shape[1]))
        for layer in range(L):
            cache = cache.update(layer, k, v, slots)
        return cache

    k, v = _kv(9, 2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        out = step(cache, k, v, jnp.asarray([2, 1, 0], jnp.int32))
    assert isinstance(out, DenseKVCache)
    np.testing.assert_array_equal(np.asarray(out.lengths), [4, 3, 2])
    np.testing.assert_array_equal(_logical(out.k)[1, 0, 2:4], np.asarray(k)[0])
    np.testing.assert_array_equal(_logical(out.k)[0, 0, :2], expected_k0[0, :2])
    np.testing.assert_array_equal(np.asarray(out.positions)[2], [0, 1, -1, -1, -1, -1, -1, -1])


# ------------------------------------------------------------------ lossless invariant (tiny Llama)

# Float32 model, logits of size ~0.1-1: the cached and cacheless paths differ only in
# summation order (extra masked slots contribute exact zeros); 1e-5 is ~100 ulps.
LOGIT_TOL = dict(rtol=1e-5, atol=1e-5)


def _config(**changes) -> ModelConfig:
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    return cfg.replace(**changes)


@functools.cache
def _params():
    """Parameters of LlamaModel(_config(), rngs=nnx.Rngs(0)), built under jit (faster than
    eager init on CPU; identical up to float rounding of the initialisers)."""
    return jax.jit(lambda: nnx.split(LlamaModel(_config(), rngs=nnx.Rngs(0)))[1])()


@functools.cache
def _model_fn(sliding: bool = False):
    """A jitted forward(tokens, cache, positions) of a fixed random model.

    The sliding-window model shares the parameters of the plain one (the window is
    a static switch of the module graph, not a parameter).
    """
    cfg = _config(sliding_window=4, sliding_layers=(True, True)) if sliding else _config()
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: LlamaModel(cfg, rngs=nnx.Rngs(0))))

    @jax.jit
    def run(params, tokens, cache, positions):
        return forward(nnx.merge(graphdef, params), tokens, cache=cache, positions=positions)

    def call(tokens, cache, positions=None):
        """Positions default to what forward would pick: the cache's next ones, or 0..T-1."""
        if positions is None:
            b, t = tokens.shape
            positions = (jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if cache is None
                         else cache.next_positions(t))
        return run(_params(), tokens, cache, positions)

    return cfg, call


def _tokens(seed: int, b: int = 2, t: int = 9) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 61, size=(b, t)), jnp.int32)


def _decode(run, cfg, tokens: jax.Array, chunks: list[int], capacity: int = 16) -> np.ndarray:
    """Feed `tokens` chunk by chunk through a dense cache; returns all logits [B, T, V]."""
    cache = DenseKVCache.for_model(cfg, tokens.shape[0], capacity)
    logits, start = [], 0
    for size in chunks:
        out, cache = run(tokens[:, start:start + size], cache)
        logits.append(np.asarray(out))
        start += size
    assert start == tokens.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.lengths), [start] * tokens.shape[0])
    return np.concatenate(logits, axis=1)


# Chunk sizes are drawn from {5, 3, 1} (and full forwards use T = 9) so the tests
# share a handful of compiled shapes.


def test_prefill_then_decode_equals_full_forward() -> None:
    cfg, run = _model_fn()
    tokens = _tokens(0)
    full, none_cache = run(tokens, None)
    assert none_cache is None and full.shape == (2, 9, 61)
    got = _decode(run, cfg, tokens, [5, 1, 1, 1, 1])
    np.testing.assert_allclose(got, np.asarray(full), **LOGIT_TOL)


def test_chunked_prefill_equals_full_forward() -> None:
    cfg, run = _model_fn()
    tokens = _tokens(1)
    full, _ = run(tokens, None)
    got = _decode(run, cfg, tokens, [3, 5, 1])
    np.testing.assert_allclose(got, np.asarray(full), **LOGIT_TOL)


def test_rollback_of_wrong_tokens_is_lossless() -> None:
    cfg, run = _model_fn()
    tokens = _tokens(2)
    full, _ = run(tokens, None)
    cache = DenseKVCache.for_model(cfg, 2, 16)
    _, cache = run(tokens[:, :5], cache)
    wrong = (tokens[:, 5:8] + 7) % 61
    wrong_logits, cache = run(wrong, cache)
    assert np.abs(np.asarray(wrong_logits) - np.asarray(full)[:, 5:8]).max() > 1e-3  # really wrong
    cache = cache.truncate(jnp.asarray([5, 5], jnp.int32))
    right, cache = run(tokens[:, 5:8], cache)
    np.testing.assert_allclose(np.asarray(right), np.asarray(full)[:, 5:8], **LOGIT_TOL)
    np.testing.assert_array_equal(np.asarray(cache.positions)[:, :9], [list(range(8)) + [-1]] * 2)
    last, _ = run(tokens[:, 8:], cache)
    np.testing.assert_allclose(np.asarray(last)[:, 0], np.asarray(full)[:, 8], **LOGIT_TOL)


def test_ragged_rollback_per_row() -> None:
    """Rows accept different numbers of draft tokens; each continues losslessly."""
    cfg, run = _model_fn()
    tokens = _tokens(3)
    full, _ = run(tokens, None)
    cache = DenseKVCache.for_model(cfg, 2, 16)
    _, cache = run(tokens[:, :5], cache)
    draft = tokens[:, 5:8].at[1, 1:].set((tokens[1, 6:8] + 1) % 61)  # row 1: only 1 of 3 right
    _, cache = run(draft, cache)
    cache = cache.truncate(jnp.asarray([8, 6], jnp.int32))
    nxt = jnp.stack([tokens[0, 8], tokens[1, 6]])[:, None]
    logits, cache = run(nxt, cache)
    np.testing.assert_allclose(np.asarray(logits)[0, 0], np.asarray(full)[0, 8], **LOGIT_TOL)
    np.testing.assert_allclose(np.asarray(logits)[1, 0], np.asarray(full)[1, 6], **LOGIT_TOL)


def test_left_padded_prompt_equals_unpadded() -> None:
    cfg, run = _model_fn()
    tokens = _tokens(4)
    full, _ = run(tokens, None)
    # row 1 holds only 3 real tokens, left-padded with 2 pad slots (position -1);
    # a causal forward's first 3 logits do not depend on the tokens after them
    padded = jnp.stack([tokens[0, :5], jnp.concatenate([jnp.zeros(2, jnp.int32), tokens[1, :3]])])
    positions = jnp.asarray([[0, 1, 2, 3, 4], [-1, -1, 0, 1, 2]], jnp.int32)
    cache = DenseKVCache.for_model(cfg, 2, 16)
    logits, cache = run(padded, cache, positions)
    np.testing.assert_allclose(np.asarray(logits)[0], np.asarray(full)[0, :5], **LOGIT_TOL)
    np.testing.assert_allclose(np.asarray(logits)[1, 2:], np.asarray(full)[1, :3], **LOGIT_TOL)
    np.testing.assert_array_equal(np.asarray(cache.next_positions(1)), [[5], [3]])
    nxt, _ = run(jnp.stack([tokens[0, 5], tokens[1, 3]])[:, None], cache)
    np.testing.assert_allclose(np.asarray(nxt)[0, 0], np.asarray(full)[0, 5], **LOGIT_TOL)
    np.testing.assert_allclose(np.asarray(nxt)[1, 0], np.asarray(full)[1, 3], **LOGIT_TOL)


def test_sliding_window_decode_equals_full_forward() -> None:
    cfg, run = _model_fn(sliding=True)
    _, run_full_attention = _model_fn()  # same parameters, no window
    tokens = _tokens(5)
    full, _ = run(tokens, None)
    got = _decode(run, cfg, tokens, [5, 1, 1, 1, 1])
    np.testing.assert_allclose(got, np.asarray(full), **LOGIT_TOL)
    # the window matters: identical to full attention while t < 4, different after
    no_window, _ = run_full_attention(tokens, None)
    np.testing.assert_allclose(np.asarray(full)[:, :4], np.asarray(no_window)[:, :4], **LOGIT_TOL)
    assert np.abs(np.asarray(full)[:, 4:] - np.asarray(no_window)[:, 4:]).max() > 1e-4


def test_forward_refuses_to_overflow_a_concrete_cache() -> None:
    from flax import nnx

    from efficient.models import LlamaModel, ModelConfig, forward, jit_forward

    config = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=8)
    model = LlamaModel(config, rngs=nnx.Rngs(0))
    cache = DenseKVCache.for_model(config, batch_size=1, capacity=4)
    _, cache = forward(model, jnp.ones((1, 3), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match="exceeds its capacity 4"):
        forward(model, jnp.ones((1, 2), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match="exceeds its capacity 4"):
        jit_forward(model)(jnp.ones((1, 2), jnp.int32), cache=cache)


# ------------------------------------------------------------------ traced layer index / kernel view


def test_update_and_view_with_a_traced_layer_index_under_scan() -> None:
    """Layers under lax.scan: update/view take a traced int32 layer index."""
    cache = _empty()
    cache, slots = cache.reserve(jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (B, 3)))
    pairs = [_kv(20 + layer, 3) for layer in range(L)]
    ks, vs = jnp.stack([k for k, _ in pairs]), jnp.stack([v for _, v in pairs])

    def body(cache: DenseKVCache, xs: tuple) -> tuple:
        layer, k, v = xs
        cache = cache.update(layer, k, v, slots)
        return cache, cache.view(layer).k

    scanned, seen = jax.jit(lambda c: jax.lax.scan(body, c, (jnp.arange(L, dtype=jnp.int32), ks, vs)))(cache)
    eager = cache
    for layer in range(L):
        eager = eager.update(layer, ks[layer], vs[layer], slots)
    np.testing.assert_array_equal(np.asarray(scanned.k), np.asarray(eager.k))
    np.testing.assert_array_equal(np.asarray(scanned.v), np.asarray(eager.v))
    np.testing.assert_array_equal(np.asarray(seen), np.asarray(eager.k))


def test_cache_view_feeds_the_decode_kernel_in_place() -> None:
    """The pallas_tpu decode path reads the cache's [B, K, S, H] view with its lengths
    (interpret mode): same output as "xla", and garbage past each row's length is ignored."""
    from efficient.attention import AttentionSpec, attention

    cache = DenseKVCache.init(num_layers=1, batch_size=2, capacity=200, num_kv_heads=1, head_dim=64)
    cache, slots = cache.reserve(jnp.broadcast_to(jnp.arange(150, dtype=jnp.int32), (2, 150)))
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((2, 150, 1, 64)), jnp.float32) for _ in range(2))
    cache = cache.update(0, k, v, slots).truncate(jnp.asarray([150, 61], jnp.int32))
    # garbage in row 1 past its length (rolled-back tokens): NaN
    cache = dataclasses.replace(cache, k=cache.k.at[:, 1, :, 61:].set(jnp.nan), v=cache.v.at[:, 1, :, 61:].set(jnp.nan))
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 64)), jnp.float32)
    q_pos = (cache.lengths - 1)[:, None]
    view = cache.view(0)
    spec = AttentionSpec(window=40)
    got = attention(q, view, spec=spec, q_positions=q_pos, implementation="pallas_tpu")
    want = attention(q, view, spec=spec, q_positions=q_pos, implementation="xla")
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ per-layer buffers


def _stored(x: jax.Array | tuple[jax.Array, ...]) -> np.ndarray:
    return np.stack([np.asarray(a) for a in x]) if isinstance(x, tuple) else np.asarray(x)


def test_per_layer_buffers_hold_what_the_stacked_cache_holds() -> None:
    """`split_layers` keeps the same contents in L buffers; reserve, update, view, truncate
    and select then give what the stacked cache gives; `stack_layers` turns it back."""
    stacked, _, _ = _filled([7, 7, 5])
    split = stacked.split_layers()
    assert split.per_layer and not stacked.per_layer and isinstance(split.k, tuple) and len(split.k) == L
    assert (split.capacity, split.num_layers, split.batch_size, split.num_kv_heads, split.head_dim) == (S, L, B, K, H)
    assert split.nbytes() == stacked.nbytes()
    source = jnp.asarray([[3, 5, 6], [4, 0, 0], [1, 2, 0]], jnp.int32)
    counts, start = jnp.asarray([3, 1, 0], jnp.int32), jnp.asarray([3, 3, 4], jnp.int32)
    k, v = _kv(7, 1)

    def steps(cache: DenseKVCache) -> DenseKVCache:
        cache = cache.select(source, counts, start)
        cache, slots = cache.reserve(cache.next_positions(1))
        return cache.update(1, k, v, slots).truncate(jnp.asarray([5, 5, 5], jnp.int32))

    a, b = steps(stacked), steps(split)
    assert b.per_layer
    for layer in range(L):
        va, vb = a.view(layer), b.view(layer)
        for x, y in ((va.k, vb.k), (va.v, vb.v), (va.positions, vb.positions), (va.lengths, vb.lengths)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(_stored(b.stack_layers().k), np.asarray(a.k))
    assert stacked.stack_layers() is stacked and not b.stack_layers().per_layer
    assert split.split_layers() is split


def test_per_layer_buffers_refuse_a_traced_layer_index() -> None:
    split = _empty().split_layers()
    k, v = _kv(8, 1)

    def write(cache: DenseKVCache, layer: jax.Array) -> DenseKVCache:
        cache, slots = cache.reserve(cache.next_positions(1))
        return cache.update(layer, k, v, slots)

    with pytest.raises(TypeError, match="per-layer buffers.*stack_layers"):
        jax.jit(write)(split, jnp.int32(0))
    with pytest.raises(TypeError, match="layer"):
        split.view(L)  # out of range
