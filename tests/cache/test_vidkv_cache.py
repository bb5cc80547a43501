"""VidKV's 1.x-bit keys and ternary values (Tao et al. 2025): the codec's exact error identities
(a skipped quantizer fails them), the packing, the cache storing exactly the codec of the
flushed tokens with an exact residual, attention over its view equal to the oracle, decode
within a stated distance of the dense cache, rollback, memory, and bad settings refused."""

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
from efficient.attention import CAPABILITIES, AttentionSpec, unsupported
from efficient.attention.lowbit import (
    anomalous_order,
    dequantize_keys_lowbit,
    dequantize_values_ternary,
    pack_bits,
    pack_trits,
    quantize_keys_lowbit,
    quantize_values_ternary,
    real_dft_basis,
    unpack_bits,
    unpack_trits,
)
from efficient.attention.views import dense_kv, slot_positions
from efficient.cache import DenseKVCache
from efficient.cache.kivi import KIVICache
from efficient.cache.vidkv import VidKVCache

G, RESIDUAL = 8, 8


@functools.cache
def _model():  # noqa: ANN202
    return tiny_model(head_dim=16)


def _vidkv(b: int = 2, capacity: int = 64, **kwargs: object) -> VidKVCache:
    return VidKVCache.for_model(_model().config, b, capacity, group_size=G, residual_length=RESIDUAL, **kwargs)


def _tokens(seed: int, b: int = 2, t: int = 40) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(1, 61, size=(b, t)), jnp.int32)


CHUNKS = [13, 1, 3, 1, 3, 3, 3, 13]  # 40 tokens: flushes from the residual and from a long chunk


@functools.cache
def _prefilled(kind: str) -> tuple[np.ndarray, object]:
    cache = {"dense": lambda: DenseKVCache.for_model(_model().config, 2, 64),
             "vidkv": _vidkv, "vidkv_nofft": lambda: _vidkv(fft=False),
             "kivi8": lambda: KIVICache.for_model(_model().config, 2, 64, bits=8, group_size=G,
                                                  residual_length=RESIDUAL)}[kind]()
    return run_in_chunks(_model(), cache, _tokens(0), CHUNKS)


def _groups(seed: int, shape: tuple = (2, 3, 8, 2, 16)) -> jax.Array:
    """[B, F, g, K, H] with a few wide channels, as keys have."""
    x = np.random.default_rng(seed).normal(size=shape)
    x[..., 3] *= 8
    x[..., 10] += 5
    return jnp.asarray(x, jnp.float32)


# ------------------------------------------------------------------ codec


def test_real_dft_basis_is_orthonormal_and_is_the_scaled_rfft() -> None:
    for n in (5, 8, 32):
        basis = real_dft_basis(n)
        np.testing.assert_allclose(basis @ basis.T, np.eye(n), atol=1e-5)
        x = np.random.default_rng(n).normal(size=n)
        y, r = basis @ x, np.fft.rfft(x, norm="ortho")
        m = (n - 1) // 2
        np.testing.assert_allclose(y[0], r[0].real, atol=1e-5)
        np.testing.assert_allclose(y[1:2 * m + 1:2], np.sqrt(2) * r[1:m + 1].real, atol=1e-5)
        np.testing.assert_allclose(y[2:2 * m + 2:2], -np.sqrt(2) * r[1:m + 1].imag, atol=1e-5)
        if n % 2 == 0:
            np.testing.assert_allclose(y[-1], r[-1].real, atol=1e-5)


def test_bits_and_trits_pack_and_unpack() -> None:
    rng = np.random.default_rng(0)
    for h in (8, 13, 64):
        bits = jnp.asarray(rng.integers(0, 2, size=(3, h)), jnp.uint8)
        assert pack_bits(bits).shape == (3, -(-h // 8))
        np.testing.assert_array_equal(unpack_bits(pack_bits(bits), h), bits)
        trits = jnp.asarray(rng.integers(0, 3, size=(3, h)))
        assert pack_trits(trits).shape == (3, -(-h // 5)) and pack_trits(trits).dtype == jnp.uint8
        np.testing.assert_array_equal(unpack_trits(pack_trits(trits), h), trits)


@pytest.mark.parametrize("fft", [True, False])
def test_key_codec_keeps_the_widest_channels_at_2_bits_and_meets_its_error_identities(fft: bool) -> None:
    """Per (group, head): the anomalous channels are the A widest and are within half a 2-bit
    step; the others' squared error is exactly sum(y^2) - g * s^2 per coefficient y (sign
    quantization with its least-squares scale s = mean |y|), in the channel domain too (the
    DFT is orthonormal). Zero error, as a skipped quantizer gives, fails both."""
    k = _groups(1)
    b, f, g, kh, h = k.shape
    a = 8
    fields = quantize_keys_lowbit(k, a, fft)
    got = np.asarray(dequantize_keys_lowbit(fields["k_codes"], fields["k_scale"], fields["k_zero"], fields["k_mask"],
                                            group_size=g, anomalous=a, fft=fft)).reshape(k.shape)
    x = np.asarray(k, np.float64)
    mask = np.asarray(unpack_bits(fields["k_mask"], h)).astype(bool)  # B F K H
    spread = x.max(axis=2) - x.min(axis=2)
    for idx in np.ndindex(b, f, kh):
        wide = np.sort(np.argsort(-spread[idx])[:a])
        np.testing.assert_array_equal(np.flatnonzero(mask[idx]), wide)
        xs = x[idx[0], idx[1], :, idx[2]]  # g H
        err = got[idx[0], idx[1], :, idx[2]] - xs
        step = spread[idx][wide] / 3
        assert np.all(np.abs(err[:, wide]) <= step / 2 + 1e-5)
        normal = xs[:, ~mask[idx]]
        y = normal @ real_dft_basis(h - a).T.astype(np.float64) if fft else normal
        expected = np.sum(y ** 2) - g * np.sum(np.mean(np.abs(y), axis=0) ** 2)
        assert expected > 1.0
        np.testing.assert_allclose(np.sum(err[:, ~mask[idx]] ** 2), expected, rtol=1e-4)
    assert fields["k_codes"].shape == (b, f * g, kh, (h + a) // 8)  # 1.5 bits per entry


def test_value_codec_is_ternary_with_its_least_squares_scale() -> None:
    """Entries within half the channel's mean |x| become 0, the others sign * s with s the mean
    |x| of the kept ones: squared error sum(x^2) - kept * s^2 exactly."""
    v = _groups(2)
    b, f, g, kh, h = v.shape
    fields = quantize_values_ternary(v)
    got = np.asarray(dequantize_values_ternary(fields["v_codes"], fields["v_scale"], group_size=g)).reshape(v.shape)
    x = np.asarray(v, np.float64)
    kept = np.abs(x) > 0.5 * np.mean(np.abs(x), axis=2, keepdims=True)
    np.testing.assert_array_equal(got != 0, kept)
    s = np.sum(np.abs(x) * kept, axis=2) / np.maximum(kept.sum(axis=2), 1)
    np.testing.assert_allclose(np.sum((got - x) ** 2, axis=2), np.sum(x ** 2, axis=2) - kept.sum(axis=2) * s ** 2,
                               rtol=1e-4, atol=1e-5)
    assert fields["v_codes"].shape == (b, f * g, kh, -(-h // 5))  # 1.6 bits per entry


def test_anomalous_order_inverts_the_sorted_layout() -> None:
    mask = jnp.asarray([[True, False, False, True, False, True]])
    np.testing.assert_array_equal(anomalous_order(mask, 3), [[0, 3, 4, 1, 5, 2]])


# ------------------------------------------------------------------ cache


def test_the_cache_stores_the_codec_of_the_flushed_tokens_and_an_exact_residual() -> None:
    """Layer 0's keys and values depend on the tokens only: the packed slots hold exactly the
    codec applied to the dense cache's groups, the residual the exact keys and values."""
    _, dense = _prefilled("dense")
    _, cache = _prefilled("vidkv")
    q = np.asarray(cache.quantized)
    assert np.all(q % G == 0) and np.all(q >= 40 - RESIDUAL - G) and np.all(q <= 40 - RESIDUAL)
    view = cache.view(0)
    k, v = (np.asarray(x) for x in dense_kv(view))
    ref = dense.view(0)
    k_ref, v_ref = (np.swapaxes(np.asarray(x), 1, 2) for x in (ref.k, ref.v))  # B S K H
    pos = np.asarray(slot_positions(view))
    for row in range(2):
        n = q[row]
        groups = lambda x: jnp.asarray(x[row:row + 1, :n].reshape(1, n // G, G, *x.shape[2:]))  # noqa: E731
        kf = quantize_keys_lowbit(groups(k_ref), cache.anomalous, True)
        want_k = dequantize_keys_lowbit(kf["k_codes"], kf["k_scale"], kf["k_zero"], kf["k_mask"], group_size=G,
                                        anomalous=cache.anomalous, fft=True)
        vf = quantize_values_ternary(groups(v_ref))
        want_v = dequantize_values_ternary(vf["v_codes"], vf["v_scale"], group_size=G)
        np.testing.assert_allclose(k[row, :n], want_k[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v[row, :n], want_v[0], rtol=1e-5, atol=1e-5)
        assert np.abs(k[row, :n] - k_ref[row, :n]).max() > 0.01  # really quantized
        live = pos[row, cache.capacity:] >= 0
        slots = np.asarray(cache.residual_slots[row])[live]
        np.testing.assert_array_equal(np.sort(slots), np.arange(n, 40))
        np.testing.assert_array_equal(k[row, cache.capacity:][live], k_ref[row, slots])


def test_blockwise_attention_over_the_view_equals_the_oracle_and_kernels_refuse_it() -> None:
    _, cache = _prefilled("vidkv")
    view = cache.view(1)
    assert_xla_matches_the_oracle(view, num_heads=4, head_dim=16, last_position=39)
    caps = dataclasses.replace(CAPABILITIES["pallas_tpu_quantized"], head_dims=None)
    q = jnp.zeros((2, 1, 4, 16), jnp.float32)
    reason = unsupported("pallas_tpu_quantized", q, view, AttentionSpec(), capabilities=caps)
    assert reason is not None and "LowBitView is not served" in reason


def test_decode_stays_within_a_stated_distance_of_dense_and_is_lossier_than_8_bit_kivi() -> None:
    """Max logit distance to the dense cache over 40 tokens (tiny model, logits ~ +-20)."""
    want, _ = _prefilled("dense")
    err = {kind: np.abs(_prefilled(kind)[0] - want).max() for kind in ("vidkv", "vidkv_nofft", "kivi8")}
    assert 0 < err["kivi8"] < err["vidkv"] < 10.0 and 0 < err["vidkv_nofft"] < 10.0, err
    # The first chunk attends only to tokens in full precision (the residual plus one group).
    np.testing.assert_allclose(_prefilled("vidkv")[0][:, :13], want[:, :13], rtol=1e-5, atol=1e-5)


def test_rollback_into_the_packed_store_returns_the_stored_values_to_the_residual() -> None:
    _, cache = run_in_chunks(_model(), _vidkv(), _tokens(5), CHUNKS[:-1])  # 27 tokens
    before = [np.asarray(x) for x in dense_kv(cache.view(0))]
    cut = cache.truncate(jnp.asarray([11, 20], jnp.int32))
    np.testing.assert_array_equal(cut.quantized, [8, 16])
    view = cut.view(0)
    pos = np.asarray(slot_positions(view))
    after = [np.asarray(x) for x in dense_kv(view)]
    for row, n in enumerate((11, 20)):
        held = pos[row] >= 0
        np.testing.assert_array_equal(np.sort(pos[row][held]), np.arange(n))
        # Slot s (position s here) holds what the packed store held: quantization is not undone.
        order = np.argsort(pos[row][held])
        before_pos = np.asarray(slot_positions(cache.view(0)))[row]
        src = [np.flatnonzero(before_pos == p)[0] for p in range(n)]
        for x_after, x_before in zip(after, before, strict=True):
            np.testing.assert_allclose(x_after[row][held][order], x_before[row][src], rtol=1e-6, atol=1e-6)
    logits, _ = run_in_chunks(_model(), cut, _tokens(6, t=4), [3, 1])
    assert np.all(np.isfinite(logits))


def test_sink_slots_are_kept_exact_through_flushes_and_rollback() -> None:
    """sinks=3: once flushed, slots 0-2 read back exactly (layer 0 depends on the tokens only),
    slot 3 on is quantized; a rollback into the first group returns them to the residual exact."""
    _, dense = _prefilled("dense")
    ref = dense.view(0)
    k_ref, v_ref = (np.swapaxes(np.asarray(x), 1, 2) for x in (ref.k, ref.v))
    _, cache = run_in_chunks(_model(), _vidkv(sinks=3), _tokens(0), CHUNKS)
    k, v = (np.asarray(x) for x in dense_kv(cache.view(0)))
    np.testing.assert_array_equal(k[:, :3], k_ref[:, :3])
    np.testing.assert_array_equal(v[:, :3], v_ref[:, :3])
    # No window: the queries see the sink slots, so the xla path's overlay is compared too.
    assert_xla_matches_the_oracle(cache.view(1), num_heads=4, head_dim=16, last_position=39, window=None)
    assert np.abs(k[:, 3:8] - k_ref[:, 3:8]).max(axis=(2, 3)).min() > 0  # every other slot of the group is quantized
    cut = cache.truncate(jnp.asarray([5, 5], jnp.int32))
    assert np.all(np.asarray(cut.quantized) == 0)
    view = cut.view(0)
    pos = np.asarray(slot_positions(view))
    k_cut = np.asarray(dense_kv(view)[0])
    for row in range(2):
        for slot in range(3):
            entry = np.flatnonzero(pos[row] == slot)[0]
            np.testing.assert_array_equal(k_cut[row, entry], k_ref[row, slot])


def test_nbytes_is_codes_scales_mask_and_residual() -> None:
    """H = 16, A = 8, g = 8, float32: per (slot, head) 3 key-code bytes and 4 value bytes; per
    (group, head) 16 + 8 key scale/zero floats, 2 mask bytes and 16 value-scale floats."""
    cache = VidKVCache.init(num_layers=3, batch_size=2, capacity=64, num_kv_heads=2, head_dim=16, group_size=8,
                            residual_length=8)
    lbk = 3 * 2 * 2
    codes = lbk * 64 * (3 + 4)
    per_group = lbk * (64 // 8) * ((16 + 8 + 16) * 4 + 2)
    residual = 2 * lbk * 16 * 16 * 4
    bookkeeping = (2 * 64 + 2 * 2 * 16 + 5 * 2) * 4  # positions, residual positions and slots, 5 [B] arrays
    assert cache.nbytes() == codes + per_group + residual + bookkeeping


@pytest.mark.parametrize("kwargs, match", [
    (dict(anomalous_fraction=1.5), "anomalous_fraction=1.5 must be in"),
    (dict(fft=1), "fft=1 must be a bool"),
    (dict(sinks=9), r"sinks=9 must be an int in \[0, group_size=8\]"),
    (dict(residual_length=200), "residual_length=200 is larger than the capacity 64"),
    (dict(group_size=0), "group_size must be a positive int"),
])
def test_bad_settings_are_refused_with_the_argument_named(kwargs: dict, match: str) -> None:
    settings = dict(group_size=8, residual_length=8) | kwargs
    with pytest.raises(ValueError, match=match):
        VidKVCache.init(num_layers=2, batch_size=2, capacity=64, num_kv_heads=2, head_dim=16, **settings)
