"""KIVICache: what it stores is within the analytic bound of min-max rounding (and
really quantized), the residual is exact, attention over its view equals the oracle
on the dequantized keys, decode stays within a stated distance of the dense cache,
rollback and tree commits move the right entries, and bad settings are refused."""

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
from efficient.attention.views import dense_kv, slot_positions
from efficient.cache import DenseKVCache
from efficient.cache.kivi import KIVICache

G, RESIDUAL = 8, 8


@functools.cache
def _model():  # noqa: ANN202
    return tiny_model(head_dim=16)


def _kivi(bits: int, b: int = 2, capacity: int = 64, **gear: object) -> KIVICache:
    return KIVICache.for_model(_model().config, b, capacity, bits=bits, group_size=G, residual_length=RESIDUAL,
                               **gear)


def _tokens(seed: int, b: int = 2, t: int = 40) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(1, 61, size=(b, t)), jnp.int32)


def _run(cache, tokens: jax.Array, chunks: list[int]) -> tuple[np.ndarray, object]:  # noqa: ANN001
    return run_in_chunks(_model(), cache, tokens, chunks)


CHUNKS = [13, 1, 3, 1, 3, 3, 3, 13]  # 40 tokens: flushes from the residual and from a long chunk


@functools.cache
def _prefilled(bits: int | None, **gear: object) -> tuple[np.ndarray, object]:
    """Logits and cache after CHUNKS of the shared tokens (bits None: the dense cache);
    shared by the tests of this module (one run per cache setting)."""
    cache = DenseKVCache.for_model(_model().config, 2, 64) if bits is None else _kivi(bits, **gear)
    return _run(cache, _tokens(0), CHUNKS)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stored_keys_and_values_are_within_the_rounding_bound_and_really_quantized(bits: int) -> None:
    """Layer 0's keys and values depend on the tokens only, so dense and KIVI caches store the
    same ones: every quantized entry is within half a step of the exact one, some error is
    nonzero, the residual is exact."""
    _, dense = _prefilled(None)
    _, kivi = _prefilled(bits)
    q = np.asarray(kivi.quantized)
    assert np.all(q % G == 0) and np.all(q >= 40 - RESIDUAL - G) and np.all(q <= 40 - RESIDUAL)
    for layer in (0,):
        view = kivi.view(layer)
        k, v = (np.asarray(x, np.float64) for x in dense_kv(view))
        ref = dense.view(layer)
        k_ref, v_ref = (np.swapaxes(np.asarray(x, np.float64), 1, 2) for x in (ref.k, ref.v))
        pos = np.asarray(slot_positions(view))  # packed slots, then residual entries
        for row in range(2):
            n = q[row]
            k_err = np.abs(k[row, :n] - k_ref[row, :n])
            step = np.repeat(np.asarray(view.k_scale[row, : n // G]), G, axis=0)
            assert np.all(k_err <= step / 2 + 1e-5)
            v_err = np.abs(v[row, :n] - v_ref[row, :n])
            v_step = np.repeat(np.asarray(view.v_scale[row, :n]), G, axis=-1)
            assert np.all(v_err <= v_step / 2 + 1e-5)
            assert k_err.max() > 0 and v_err.max() > 0  # quantization happened
            live = pos[row, kivi.capacity:] >= 0
            slots = np.asarray(kivi.residual_slots[row])[live]
            np.testing.assert_array_equal(np.sort(slots), np.arange(n, 40))
            np.testing.assert_array_equal(k[row, kivi.capacity:][live], k_ref[row, slots])


@pytest.mark.parametrize("gear", [{}, dict(rank=2, outlier_fraction=0.05)], ids=["kivi", "gear"])
def test_blockwise_attention_over_the_view_equals_the_oracle(gear: dict) -> None:
    _, kivi = _prefilled(4, **gear)
    assert_xla_matches_the_oracle(kivi.view(1), num_heads=4, head_dim=16, last_position=39)


def test_decode_stays_near_dense_and_lossier_at_fewer_bits() -> None:
    """Max logit distance to the dense cache over 40 tokens (tiny model, logits ~ +-20):
    8-bit within 0.1, and the distance grows as bits shrink (a skipped quantizer fails)."""
    want, _ = _prefilled(None)
    err = {bits: np.abs(_prefilled(bits)[0] - want).max() for bits in (2, 4, 8)}
    assert 0 < err[8] < 0.1 < err[4] < err[2], err
    # Tokens attended in full precision (the first prompt chunk fits the residual + one group) are exact.
    np.testing.assert_allclose(_prefilled(2)[0][:, :13], want[:, :13], rtol=1e-5, atol=1e-5)


def test_rollback_into_the_packed_store_and_select_keep_positions_and_values() -> None:
    tokens = _tokens(5)
    _, kivi = _run(_kivi(8), tokens, CHUNKS[:-1])  # 27 tokens
    # Tree commit: move the last forward's slots 25, 26 to 24, 25.
    moved = kivi.select(jnp.asarray([[25, 26]] * 2, jnp.int32), jnp.asarray([2, 1], jnp.int32),
                        jnp.asarray([24, 24], jnp.int32))
    np.testing.assert_array_equal(moved.lengths, [26, 25])
    before, after = kivi.view(0), moved.view(0)
    r = kivi.ring_size
    np.testing.assert_array_equal(after.residual_k[0, 24 % r], before.residual_k[0, 25 % r])
    np.testing.assert_array_equal(after.residual_positions[0, 25 % r], 26)
    # A rollback below the packed store brings the partial group back to the residual.
    cut = moved.truncate(jnp.asarray([11, 20], jnp.int32))
    np.testing.assert_array_equal(cut.quantized, [8, 16])
    pos = np.asarray(slot_positions(cut.view(0)))
    for row, n in enumerate((11, 20)):
        held = np.sort(pos[row][pos[row] >= 0])
        np.testing.assert_array_equal(held, np.arange(n))
    # Decoding on after the cut equals decoding from a cache that held the same tokens.
    cont = _tokens(6, t=4)
    a, _ = _run(cut, cont, [3, 1])
    assert np.all(np.isfinite(a))


def test_gear_corrections_shrink_the_error_and_keep_outliers_exact() -> None:
    """GEAR on 2-bit KIVI (Kang et al. 2024): the low-rank part and the outliers bring layer 0's
    stored keys and values closer to the exact ones; kernels without corrections refuse the view."""
    _, dense = _prefilled(None)  # layer 0's keys and values depend on the tokens only, not the chunks
    ref = dense.view(0)
    exact = np.concatenate([np.swapaxes(np.asarray(x), 1, 2) for x in (ref.k, ref.v)], axis=-1)
    errors = {}
    for name, gear in (("kivi", {}), ("lowrank", dict(rank=2)), ("outliers", dict(outlier_fraction=0.05)),
                       ("gear", dict(rank=2, outlier_fraction=0.05))):
        _, cache = _run(_kivi(2, **gear), _tokens(0), [20, 20])  # one compiled shape per setting
        n = int(np.min(cache.quantized))
        got = np.concatenate([np.asarray(x) for x in dense_kv(cache.view(0))], axis=-1)
        errors[name] = float(np.linalg.norm(got[:, :n] - exact[:, :n]))
    assert errors["gear"] < errors["lowrank"] < errors["kivi"] and errors["outliers"] < errors["kivi"], errors
    view = cache.view(0)
    q = jnp.zeros((2, 1, 4, 16), jnp.float32)
    caps = dataclasses.replace(CAPABILITIES["pallas_tpu_quantized"], head_dims=None)  # this model's H is 16
    reason = unsupported("pallas_tpu_quantized", q, view, AttentionSpec(), capabilities=caps)
    assert reason is not None and "GEAR" in reason


def test_sinks_are_exact_and_the_codes_only_kernel_refuses_them() -> None:
    """sinks=3: once flushed, slots 0-2 read back exactly, the rest of the group is quantized;
    the Pallas kernel (codes only) refuses the view rather than read the sinks quantized."""
    _, dense = _prefilled(None)
    ref = dense.view(0)
    k_ref = np.swapaxes(np.asarray(ref.k), 1, 2)
    _, cache = _run(_kivi(2, sinks=3), _tokens(0), CHUNKS)
    view = cache.view(0)
    k = np.asarray(dense_kv(view)[0])
    np.testing.assert_array_equal(k[:, :3], k_ref[:, :3])
    assert np.abs(k[:, 3:8] - k_ref[:, 3:8]).max(axis=(2, 3)).min() > 0
    # No window: the queries see the sink slots, so the xla path's overlay is compared too.
    assert_xla_matches_the_oracle(view, num_heads=4, head_dim=16, last_position=39, window=None)
    caps = dataclasses.replace(CAPABILITIES["pallas_tpu_quantized"], head_dims=None)
    reason = unsupported("pallas_tpu_quantized", jnp.zeros((2, 1, 4, 16), jnp.float32), view, AttentionSpec(),
                         capabilities=caps)
    assert reason is not None and "sink" in reason


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=9), "rank=9 must be an int in"),
    (dict(outlier_fraction=0.6), "outlier_fraction=0.6 must be in"),
    (dict(bits=3), "bits=3 cannot be packed"),
    (dict(group_size=12), "group_size=12 must divide head_dim=16"),
    (dict(residual_length=200), "residual_length=200 is larger than the capacity 64"),
    (dict(group_size=0), "group_size must be a positive int"),
    (dict(sinks=9), r"sinks=9 must be an int in \[0, group_size=8\]"),
])
def test_bad_settings_are_refused_with_the_argument_named(kwargs: dict, match: str) -> None:
    settings = dict(bits=4, group_size=8, residual_length=8) | kwargs
    with pytest.raises(ValueError, match=match):
        KIVICache.init(num_layers=2, batch_size=2, capacity=64, num_kv_heads=2, head_dim=16, **settings)
