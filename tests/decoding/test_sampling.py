"""Sampling rules: greedy, temperature and the top-k / top-p / min-p filters."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient.decoding import Greedy, Sample, sample_tokens, sampling_from_dict

# A small known distribution, in shuffled vocabulary order (the filters must not
# depend on token ids). Sorted: 0.4, 0.3, 0.2, 0.1.
PROBS4 = np.array([0.2, 0.4, 0.1, 0.3])
# Sorted: 0.5, 0.2, 0.15, 0.1, 0.05.
PROBS5 = np.array([0.15, 0.05, 0.5, 0.1, 0.2])


def _logits(probs: np.ndarray, shift: float = 1.7) -> jax.Array:
    """Logits of `probs` (an arbitrary additive shift must not matter)."""
    return jnp.asarray(np.log(probs) + shift, jnp.float32)


def _kept(rule: Sample, probs: np.ndarray) -> set[int]:
    out = np.asarray(rule.filtered_logits(_logits(probs)))
    assert not np.isnan(out).any()
    assert np.all(np.isfinite(out) | np.isneginf(out))
    return set(np.flatnonzero(np.isfinite(out)).tolist())


def _ids(probs: np.ndarray, *values: float) -> set[int]:
    """Token ids of the given probabilities."""
    return {int(np.flatnonzero(np.isclose(probs, v))[0]) for v in values}


def reference_filter(probs: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """The documented sampling law in float64: temper, then top-k, top-p, min-p.

    Asserts that no keep/drop decision lies within 1e-3 of its threshold, so that
    float32 rounding in the code under test cannot flip it (no coin-flip cases).
    """
    logits = np.log(probs) / temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    keep = np.ones_like(p, bool)
    if 0 < top_k < len(p):
        keep &= p >= np.sort(p)[-top_k]
    if top_p < 1:
        q = np.where(keep, p, 0.0) / np.where(keep, p, 0.0).sum()
        order = np.argsort(-q, kind="stable")
        before = np.cumsum(q[order]) - q[order]
        sorted_keep = before < top_p
        assert np.abs(before - top_p).min() > 1e-3, "top_p on a boundary"
        keep_p = np.zeros_like(keep)
        keep_p[order] = sorted_keep
        keep &= keep_p
    if min_p > 0:
        q = np.where(keep, p, 0.0)
        assert np.abs(q[keep] / q.max() - min_p).min() > 1e-3, "min_p on a boundary"
        keep &= q >= min_p * q.max()
    out = np.where(keep, p, 0.0)
    return out / out.sum()


# ------------------------------------------------------------------ greedy


def test_greedy_picks_argmax() -> None:
    logits = jax.random.normal(jax.random.key(0), (16, 50))
    want = np.argmax(np.asarray(logits), axis=-1)
    got = sample_tokens(Greedy(), logits, jax.random.key(1))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)
    filtered = np.asarray(Greedy().filtered_logits(logits))
    assert np.all(filtered[np.arange(16), want] == 0.0)
    assert np.isneginf(filtered).sum() == 16 * 49


@pytest.mark.parametrize("rule", [Sample(temperature=0.0), Sample(temperature=0.0, top_p=0.5),
                                  Sample(temperature=1.0, top_k=1), Sample(temperature=3.0, top_k=1)])
def test_temperature_zero_and_top_k_one_are_greedy(rule: Sample) -> None:
    assert rule.is_greedy
    # near-uniform logits: real sampling would almost surely pick other tokens
    logits = 0.01 * jax.random.normal(jax.random.key(2), (64, 20))
    want = np.argmax(np.asarray(logits), axis=-1)
    for seed in range(3):
        np.testing.assert_array_equal(np.asarray(sample_tokens(rule, logits, jax.random.key(seed))), want)
    filtered = np.asarray(rule.filtered_logits(logits))
    np.testing.assert_array_equal(np.argmax(filtered, -1), want)
    assert np.isfinite(filtered).sum() == 64


def test_sampling_is_not_greedy_by_default() -> None:
    """Guard for the greedy tests: the same logits under Sample() do vary."""
    logits = 0.01 * jax.random.normal(jax.random.key(2), (64, 20))
    got = np.asarray(sample_tokens(Sample(), logits, jax.random.key(0)))
    assert (got != np.argmax(np.asarray(logits), -1)).sum() > 32


# ------------------------------------------------------------------ filters


@pytest.mark.parametrize("k", [1, 2, 3, 7, 19])
def test_top_k_keeps_exactly_the_k_largest(k: int) -> None:
    rng = np.random.default_rng(k)
    logits = rng.permutation(np.linspace(-3.0, 2.0, 20)).astype(np.float32)  # distinct
    rule = Sample(temperature=0.8, top_k=k)
    out = np.asarray(rule.filtered_logits(jnp.asarray(logits)))
    kept = np.flatnonzero(np.isfinite(out))
    assert set(kept) == set(np.argsort(-logits)[:k])
    if k > 1:  # (top_k=1 is greedy: a one-hot law) kept logits are the tempered ones
        np.testing.assert_allclose(out[kept], logits[kept] / 0.8, rtol=1e-6)


def test_top_k_at_least_vocab_is_a_no_op() -> None:
    logits = _logits(PROBS5)
    for k in (5, 9):
        np.testing.assert_allclose(np.asarray(Sample(top_k=k).filtered_logits(logits)), np.asarray(logits),
                                   rtol=1e-6)


@pytest.mark.parametrize(
    "top_p, kept",
    [
        # sorted probs 0.5, 0.2, 0.15, 0.1, 0.05; cumulative 0.5, 0.7, 0.85, 0.95, 1.0
        (0.45, (0.5,)),  # the top token alone already has mass >= p
        (0.65, (0.5, 0.2)),  # 0.7 >= 0.65
        (0.8, (0.5, 0.2, 0.15)),  # 0.7 < 0.8 <= 0.85
        (0.9, (0.5, 0.2, 0.15, 0.1)),
        (0.97, (0.5, 0.2, 0.15, 0.1, 0.05)),
        (1e-4, (0.5,)),  # the most likely token always survives
    ],
)
def test_top_p_keeps_smallest_prefix_with_mass_at_least_p(top_p: float, kept: tuple[float, ...]) -> None:
    assert _kept(Sample(top_p=top_p), PROBS5) == _ids(PROBS5, *kept)


@pytest.mark.parametrize(
    "min_p, kept",
    [
        (0.25, (0.5, 0.2, 0.15)),  # threshold 0.125
        (0.35, (0.5, 0.2)),  # threshold 0.175
        (0.05, (0.5, 0.2, 0.15, 0.1, 0.05)),  # threshold 0.025
        (0.99, (0.5,)),  # the top token always survives
    ],
)
def test_min_p_threshold_is_relative_to_max_prob(min_p: float, kept: tuple[float, ...]) -> None:
    assert _kept(Sample(min_p=min_p), PROBS5) == _ids(PROBS5, *kept)


def test_filters_apply_to_the_tempered_distribution() -> None:
    # T = 0.5 squares the probabilities: 0.4, 0.3, 0.2, 0.1 -> .533, .3, .133, .033.
    # top_p 0.8 then keeps 2 tokens; filtering the untempered law would keep 3.
    assert _kept(Sample(temperature=0.5, top_p=0.8), PROBS4) == _ids(PROBS4, 0.4, 0.3)
    assert _kept(Sample(temperature=1.0, top_p=0.8), PROBS4) == _ids(PROBS4, 0.4, 0.3, 0.2)


def test_filters_combine_in_documented_order() -> None:
    # top-k before top-p: after top_k=3 the law is .444, .333, .222, so top_p=0.75
    # keeps 2 (mass before the third is .778); top-p first would keep 3.
    assert _kept(Sample(top_k=3, top_p=0.75), PROBS4) == _ids(PROBS4, 0.4, 0.3)
    # top-p before min-p: top_p=0.75 keeps .4, .3, .2 (mass before .2 is .7); min_p=0.3
    # (threshold .12) keeps all three. Min-p first (drops .1) then top-p would keep 2.
    assert _kept(Sample(top_p=0.75, min_p=0.3), PROBS4) == _ids(PROBS4, 0.4, 0.3, 0.2)
    # the float64 restatement of the documented order agrees on a grid of settings
    for temperature in (0.5, 1.0, 1.7):
        for top_k in (0, 2, 3):
            for top_p in (0.55, 0.72, 1.0):
                for min_p in (0.0, 0.27):
                    rule = Sample(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
                    want = reference_filter(PROBS5, temperature, top_k, top_p, min_p)
                    got = np.asarray(jax.nn.softmax(rule.filtered_logits(_logits(PROBS5))))
                    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str(rule))


def test_filters_work_row_wise_on_batches() -> None:
    logits = jnp.stack([_logits(PROBS5), _logits(PROBS5[::-1])])
    out = np.asarray(Sample(top_k=2).filtered_logits(logits))
    assert set(np.flatnonzero(np.isfinite(out[0]))) == _ids(PROBS5, 0.5, 0.2)
    assert set(np.flatnonzero(np.isfinite(out[1]))) == {4 - i for i in _ids(PROBS5, 0.5, 0.2)}


# ------------------------------------------------------------------ the sampling law


def test_sampled_frequencies_match_filtered_distribution() -> None:
    probs = np.array([0.12, 0.35, 0.05, 0.25, 0.08, 0.15])
    rule = Sample(temperature=0.7, top_p=0.9)
    # tempered sorted law: .432, .267, .129, .094, .052, .027; cumulative mass before
    # each: 0, .432, .699, .827, .921 -> top_p 0.9 keeps the four largest
    # (margins to 0.9 are .07 and .02, far above float32 error)
    want = reference_filter(probs, 0.7, 0, 0.9, 0.0)
    assert np.count_nonzero(want) == 4 and want[[2, 4]].sum() == 0
    n = 20_000
    logits = jnp.broadcast_to(_logits(probs), (n, len(probs)))
    draws = np.asarray(jax.jit(functools.partial(sample_tokens, rule))(logits, jax.random.key(1234)))
    counts = np.bincount(draws, minlength=len(probs))
    assert counts[2] == 0 and counts[4] == 0  # filtered tokens are never drawn
    freq = counts / n
    stderr = np.sqrt(want * (1 - want) / n)  # <= 0.0036 for p = .5
    assert np.all(np.abs(freq - want) <= 5 * stderr + 1e-12), (freq, want)
    # and the law is really different from the unfiltered, untempered one
    assert np.abs(freq - probs).max() > 10 * stderr.max()


def test_sampling_is_deterministic_for_a_fixed_key() -> None:
    logits = jax.random.normal(jax.random.key(5), (256, 30))
    rule = Sample(temperature=1.3, top_k=20, min_p=0.01)
    sample = jax.jit(functools.partial(sample_tokens, rule))
    a = sample(logits, jax.random.key(9))
    b = sample(logits, jax.random.key(9))
    c = sample(logits, jax.random.key(10))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a) != np.asarray(c)).sum() > 0


# ------------------------------------------------------------------ validation / configs


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.2), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.0), "min_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=math.nan), "min_p"),
    ],
)
def test_bad_parameters_raise_naming_them(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Sample(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(temperature="hot"), "temperature"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
     (dict(top_p=None), "top_p"), (dict(temperature=True), "temperature")],
)
def test_parameters_of_the_wrong_type_raise_type_error(kwargs: dict, name: str) -> None:
    with pytest.raises(TypeError, match=name):
        Sample(**kwargs)


def test_sampling_from_dict() -> None:
    assert sampling_from_dict({}) == Greedy()
    assert sampling_from_dict({"kind": "greedy"}) == Greedy()
    assert sampling_from_dict({"temperature": 0.7, "top_p": 0.9}) == Sample(temperature=0.7, top_p=0.9)
    params = {"kind": "sample", "top_k": 5, "min_p": 0.1}
    assert sampling_from_dict(params) == Sample(top_k=5, min_p=0.1)
    assert params == {"kind": "sample", "top_k": 5, "min_p": 0.1}  # the input is not mutated


@pytest.mark.parametrize(
    "params, name",
    [
        ({"kind": "sample", "temprature": 0.7}, "temprature"),
        ({"temperature": 0.7, "nucleus": 0.9}, "nucleus"),
        ({"kind": "beam"}, "beam"),
        ({"kind": "greedy", "temperature": 0.5}, "temperature"),
        ({"kind": "sample", "top_p": 2.0}, "top_p"),
    ],
)
def test_sampling_from_dict_rejects_unknown_or_bad_keys(params: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        sampling_from_dict(params)
