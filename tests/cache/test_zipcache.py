"""ZipCache (He et al. 2024): the channel-separable tokenwise codec against a numpy
re-derivation (a skipped quantizer fails it), the residual-only attention statistics equal
to the oracle's, the salient tokens chosen by the normalised attention score the oracle
gives, attention over the view equal to the oracle, decode within a stated distance of
the dense cache, rollback and tree commits, memory, and bad settings refused."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tiny import run_in_chunks, tiny_model
from helpers.views import assert_xla_matches_the_oracle

import efficient.attention.backends  # noqa: F401  (registers the pallas adapters)
from efficient.attention import CAPABILITIES, AttentionSpec, KeyStats, attention, unsupported
from efficient.attention.mixed_precision import dequantize_mixed, quantize_mixed
from efficient.attention.views import dense_kv, slot_positions
from efficient.cache import DenseKVCache
from efficient.cache.kivi import KIVICache
from efficient.cache.zipcache import ZipCache

G, RESIDUAL = 8, 8


@functools.cache
def _model():  # noqa: ANN202
    return tiny_model(head_dim=16)


def _zip(b: int = 2, capacity: int = 64, **kwargs: object) -> ZipCache:
    return ZipCache.for_model(_model().config, b, capacity, group_size=G, residual_length=RESIDUAL, **kwargs)


def _tokens(seed: int, b: int = 2, t: int = 40) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(1, 61, size=(b, t)), jnp.int32)


CHUNKS = [8, 1, 3, 1, 3, 3, 5, 8, 8]  # 40 tokens, no forward above residual_length


@functools.cache
def _prefilled(kind: str) -> tuple[np.ndarray, object]:
    cache = {"dense": lambda: DenseKVCache.for_model(_model().config, 2, 64), "zip": _zip,
             "zip_lo": lambda: _zip(salient_fraction=0.0),
             "kivi8": lambda: KIVICache.for_model(_model().config, 2, 64, bits=8, group_size=G,
                                                  residual_length=RESIDUAL)}[kind]()
    return run_in_chunks(_model(), cache, _tokens(0), CHUNKS)


# ------------------------------------------------------------------ codec


def _numpy_codec(x: np.ndarray, saliency: np.ndarray, salient: int, hi: int, lo: int) -> np.ndarray:
    """The paper's rule, re-derived in numpy: c_j = sqrt(max_t |x|), tokenwise min-max of
    x / c at hi bits for the `salient` highest-scoring tokens of the group, lo for the rest."""
    out = np.empty_like(x)
    b, f, g, kh, _ = x.shape
    for i, j, k in np.ndindex(b, f, kh):
        block = x[i, j, :, k]  # g H
        c = np.maximum(np.sqrt(np.abs(block).max(axis=0)), 1e-6)
        y = block / c
        top = set(np.argsort(-saliency[i, j, :, k], kind="stable")[:salient].tolist())
        for t in range(g):
            bits = hi if t in top else lo
            mn, mx = y[t].min(), y[t].max()
            scale = (mx - mn) / (2**bits - 1) or 1.0
            out[i, j, t, k] = (np.clip(np.round((y[t] - mn) / scale), 0, 2**bits - 1) * scale + mn) * c
    return out


def _groups(seed: int, shape: tuple = (2, 3, 8, 2, 16)) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=shape)
    x[..., 3] *= 8  # an outlier channel, as keys have
    return x.astype(np.float32)


@pytest.mark.parametrize("salient, hi, lo", [(3, 4, 2), (0, 4, 2), (8, 8, 4)])
def test_codec_matches_the_papers_rule_and_puts_the_salient_tokens_at_more_bits(salient: int, hi: int,
                                                                               lo: int) -> None:
    x = _groups(0)
    saliency = np.random.default_rng(1).random(x.shape[:4]).astype(np.float32)
    fields = quantize_mixed(jnp.asarray(x), jnp.asarray(saliency), salient=salient, hi_bits=hi, lo_bits=lo)
    got = np.asarray(dequantize_mixed(fields["hi"], fields["lo"], fields["token_scale"], fields["token_zero"],
                                      fields["channel_scale"], fields["rank"], hi_bits=hi, lo_bits=lo))
    want = _numpy_codec(x, saliency, salient, hi, lo).reshape(got.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(got - x.reshape(got.shape)).max() > 1e-3  # really quantized
    # rank < salient exactly for each group's top tokens by saliency.
    rank = np.swapaxes(np.asarray(fields["rank"]), 2, 3)  # B F g K
    top = np.argsort(np.argsort(-saliency, axis=2, kind="stable"), axis=2) < salient
    np.testing.assert_array_equal(rank < salient, top)


def test_salient_tokens_have_the_smaller_error() -> None:
    x = _groups(2, (1, 8, 8, 2, 16))
    saliency = np.random.default_rng(3).random(x.shape[:4]).astype(np.float32)
    fields = quantize_mixed(jnp.asarray(x), jnp.asarray(saliency), salient=4, hi_bits=4, lo_bits=2)
    got = np.asarray(dequantize_mixed(fields["hi"], fields["lo"], fields["token_scale"], fields["token_zero"],
                                      fields["channel_scale"], fields["rank"], hi_bits=4, lo_bits=2)).reshape(x.shape)
    err = np.abs(got - x).mean(axis=-1)  # B F g K
    top = np.argsort(np.argsort(-saliency, axis=2), axis=2) < 4
    assert err[top].mean() * 3 < err[~top].mean()


# ------------------------------------------------------------------ statistics


def test_residual_mass_from_the_block_loop_equals_the_oracles_tail() -> None:
    """`KeyStats(tail=R)` on the view: the xla path (blockwise, residual logits and final lse)
    gives the reference's full per-slot mass restricted to the residual, with a window and a mask."""
    _, cache = _prefilled("zip")
    view = cache.view(1)
    r = view.residual_k.shape[1]
    q = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 4, 16)), jnp.float32)
    q_positions = jnp.asarray([[37, 38, 39]] * 2, jnp.int32)
    mask = jnp.asarray(np.random.default_rng(5).random((2, 3, view.num_slots)) < 0.8)
    for spec, m in ((AttentionSpec(causal=True), None), (AttentionSpec(causal=True, window=12), mask)):
        for request in (KeyStats(per_kv_head=True, tail=r), KeyStats(per_query=True, heads=(0, 3), tail=r)):
            out, mass = attention(q, view, spec=spec, q_positions=q_positions, mask=m, key_stats=request,
                                  implementation="xla")
            want_out, full = attention(q, view, spec=spec, q_positions=q_positions, mask=m,
                                       key_stats=dataclasses.replace(request, tail=None), implementation="reference")
            np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(mass, np.asarray(full)[..., -r:], rtol=1e-5, atol=1e-6)
            assert float(np.asarray(mass).sum()) > 0.1
    with pytest.raises(ValueError, match="key_stats.tail=999 exceeds"):
        attention(q, view, q_positions=q_positions, key_stats=KeyStats(tail=999))


def test_salient_tokens_are_the_top_normalised_attention_scores() -> None:
    """Drive one layer by hand with random q/k/v; score each token with the oracle's full
    per-slot mass over the view, summed over the queries of the forwards it waited through in
    the residual, over the queries that could see it. Each flushed group's `hi_bits` tokens are
    the top `salient` of those scores."""
    b, kh, h, n = 1, 2, 16, 4
    cache = ZipCache.init(num_layers=1, batch_size=b, capacity=48, num_kv_heads=kh, head_dim=h, group_size=G,
                          residual_length=RESIDUAL, salient_fraction=0.5)
    rng = np.random.default_rng(7)
    mass_by_pos, count_by_pos, flushed_score = {}, {}, {}
    @jax.jit  # one compile per forward size (eager, every op compiled again for each size)
    def forward_by_hand(cache, pos, k, v, q):  # noqa: ANN001, ANN202
        cache, slots = cache.reserve(pos)
        cache = cache.update(0, k, v, slots)
        view = cache.view(0)
        _, mass = attention(q, view, q_positions=pos, key_stats=cache.key_stats, implementation="xla")
        _, full = attention(q, view, q_positions=pos, key_stats=KeyStats(per_kv_head=True),
                            implementation="reference")
        return cache.observe(0, mass, pos), full, slot_positions(view)

    for size in (4, 3, 4, 1, 4, 8, 3, 8, 4):
        pos = cache.next_positions(size)
        before = int(cache.quantized[0])
        k, v = (jnp.asarray(rng.normal(size=(b, size, kh, h)), jnp.float32) for _ in range(2))
        q = jnp.asarray(rng.normal(size=(b, size, 2 * kh, h)), jnp.float32)
        cache, full, slot_pos = forward_by_hand(cache, pos, k, v, q)
        for p in range(before, int(cache.quantized[0])):  # flushed now: scored by earlier forwards only
            flushed_score[p] = mass_by_pos[p] / count_by_pos[p]
        slot_pos = np.asarray(slot_pos)[0]
        for s, p in enumerate(slot_pos):
            if p >= 0 and p >= before:  # tokens still in the residual
                mass_by_pos[p] = mass_by_pos.get(p, 0) + np.asarray(full)[0, :, s]
                count_by_pos[p] = count_by_pos.get(p, 0) + int(np.sum(np.asarray(pos)[0] >= p))
    assert len(flushed_score) >= 3 * G
    rank = np.asarray(cache.rank)[0, 0]  # S/g K g
    for group in range(len(flushed_score) // G):
        scores = np.stack([flushed_score[group * G + t] for t in range(G)])  # g K
        top = np.argsort(np.argsort(-scores, axis=0, kind="stable"), axis=0) < n
        np.testing.assert_array_equal(rank[group].T < n, top)


# ------------------------------------------------------------------ the cache


def test_the_view_holds_the_codec_of_the_flushed_tokens_and_an_exact_residual() -> None:
    _, dense = _prefilled("dense")
    _, cache = _prefilled("zip")
    q = np.asarray(cache.quantized)
    assert np.all(q % G == 0) and np.all(q >= 40 - RESIDUAL - G) and np.all(q <= 40 - RESIDUAL)
    view = cache.view(0)
    k, v = (np.asarray(x) for x in dense_kv(view))
    ref = dense.view(0)
    k_ref, v_ref = (np.swapaxes(np.asarray(x), 1, 2) for x in (ref.k, ref.v))  # B S K H
    rank = np.swapaxes(np.asarray(cache.rank[0]), 2, 3)  # B S/g g K
    pos = np.asarray(slot_positions(view))
    for row in range(2):
        n = q[row]
        # The stored ranks as the saliency: the codec must reproduce the stored codes exactly.
        saliency = -rank[row:row + 1, :n // G].astype(np.float32)
        for x, x_ref in ((k, k_ref), (v, v_ref)):
            groups = x_ref[row:row + 1, :n].reshape(1, n // G, G, *x_ref.shape[2:])
            want = _numpy_codec(groups, saliency, cache.salient, 4, 2).reshape(n, *x_ref.shape[2:])
            np.testing.assert_allclose(x[row, :n], want, rtol=1e-4, atol=1e-4)
            assert np.abs(x[row, :n] - x_ref[row, :n]).max() > 0.01
        live = pos[row, cache.capacity:] >= 0
        slots = np.asarray(cache.residual_slots[row])[live]
        np.testing.assert_array_equal(np.sort(slots), np.arange(n, 40))
        np.testing.assert_array_equal(k[row, cache.capacity:][live], k_ref[row, slots])


def test_blockwise_attention_over_the_view_equals_the_oracle_and_kernels_refuse_it() -> None:
    _, cache = _prefilled("zip")
    assert_xla_matches_the_oracle(cache.view(1), num_heads=4, head_dim=16, last_position=39)
    caps = dataclasses.replace(CAPABILITIES["pallas_tpu_quantized"], head_dims=None)
    reason = unsupported("pallas_tpu_quantized", jnp.zeros((2, 1, 4, 16)), cache.view(1), AttentionSpec(),
                         capabilities=caps)
    assert reason is not None and "MixedPrecisionView is not served" in reason


def test_decode_stays_within_a_stated_distance_of_dense_and_saliency_helps() -> None:
    """Max logit distance to the dense cache over 40 tokens (tiny model, logits ~ +-20): above
    KIVI-8's, and all tokens at 2 bits (salient_fraction 0) is worse than half at 4 bits."""
    want, _ = _prefilled("dense")
    err = {kind: np.abs(_prefilled(kind)[0] - want).max() for kind in ("zip", "zip_lo", "kivi8")}
    assert 0 < err["kivi8"] < err["zip"] < err["zip_lo"] < 10.0, err


def test_a_forward_longer_than_the_residual_is_refused_and_generate_prefills_in_chunks() -> None:
    from efficient.decoding import generate

    with pytest.raises(ValueError, match="exceed the 8"):
        run_in_chunks(_model(), _prefilled("zip")[1], _tokens(3, t=9), [9])
    prompt = _tokens(4, b=1, t=21)
    zip_tokens = generate(_model(), prompt, max_new_tokens=6, cache=lambda c, b, s, d=None: _zip(b, s))
    dense_tokens = generate(_model(), prompt, max_new_tokens=6)
    assert np.asarray(zip_tokens).shape == np.asarray(dense_tokens).shape


def test_rollback_and_tree_commit_keep_the_scores_with_their_entries() -> None:
    _, cache = run_in_chunks(_model(), _zip(), _tokens(5), CHUNKS[:6])  # 19 tokens
    cut = cache.truncate(jnp.asarray([11, 18], jnp.int32))
    np.testing.assert_array_equal(cut.quantized, [8, 8])
    pos = np.asarray(cut.residual_positions)
    for layer in range(cut.num_layers):
        count = np.asarray(cut.residual_count[layer])
        # Entries kept keep their counts; entries back from the store (slots 8-10 of row 0) start at 0.
        kept = (np.asarray(cache.residual_slots) == np.asarray(cut.residual_slots)) & (pos >= 0)
        np.testing.assert_array_equal(count[kept], np.asarray(cache.residual_count[layer])[kept])
        assert np.all(count[(pos >= 0) & ~kept] == 0)
    # select: slots 15, 17 of row 1 move to 15, 16 with their scores.
    moved = cut.select(jnp.asarray([[0, 0], [15, 17]], jnp.int32), jnp.asarray([0, 2], jnp.int32),
                       jnp.asarray([11, 15], jnp.int32))
    r = cut.ring_size
    for name in ("residual_mass", "residual_count"):
        before, after = np.asarray(getattr(cut, name)), np.asarray(getattr(moved, name))
        np.testing.assert_array_equal(after[:, 1, 15 % r], before[:, 1, 15 % r])
        np.testing.assert_array_equal(after[:, 1, 16 % r], before[:, 1, 17 % r])  # 17 moved to 16
        assert np.any(before[:, 1, 16 % r] != before[:, 1, 17 % r])  # so the move is seen
    logits, _ = run_in_chunks(_model(), moved, _tokens(6, t=4), [3, 1])
    assert np.all(np.isfinite(logits))


def test_nbytes_is_codes_parameters_ranks_scores_and_residual() -> None:
    """H = 16, g = 8, 3 salient tokens at 4 bits and 5 at 2, float32: per (group, head) 3*8 +
    5*4 code bytes, 16 channel-scale floats and 8 rank bytes; per (slot, head) 2 token floats,
    for keys and values; the residual's scores [L, B, R, K] and counts [L, B, R]."""
    cache = ZipCache.init(num_layers=3, batch_size=2, capacity=64, num_kv_heads=2, head_dim=16, group_size=8,
                          residual_length=8, salient_fraction=3 / 8)
    lbk = 3 * 2 * 2
    per_group = lbk * 8 * (2 * (3 * 8 + 5 * 4 + 16 * 4) + 8)
    per_slot = lbk * 64 * 2 * 2 * 4
    residual = 2 * lbk * 16 * 16 * 4 + lbk * 16 * 4 + 3 * 2 * 16 * 4
    bookkeeping = (2 * 64 + 2 * 2 * 16 + 5 * 2) * 4
    assert cache.nbytes() == per_group + per_slot + residual + bookkeeping


@pytest.mark.parametrize("kwargs, match", [
    (dict(salient_fraction=1.5), "salient_fraction=1.5 must be in"),
    (dict(hi_bits=3), r"hi_bits=3 must be one of \(2, 4, 8\)"),
    (dict(lo_bits=1), r"lo_bits=1 must be one of"),
    (dict(group_size=512, capacity=1024), "group_size=512 must be at most 256"),
    (dict(residual_length=200), "residual_length=200 is larger than the capacity 64"),
])
def test_bad_settings_are_refused_with_the_argument_named(kwargs: dict, match: str) -> None:
    settings = dict(group_size=8, residual_length=8, capacity=64) | kwargs
    with pytest.raises(ValueError, match=match):
        ZipCache.init(num_layers=2, batch_size=2, num_kv_heads=2, head_dim=16, **settings)
