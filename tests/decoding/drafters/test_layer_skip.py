"""Layer-skipping self-speculation: greedy equivalence, exact drafts through the shared
cache, SpecDec++ stops, sampling, skip-set calibration, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.speculative import RAGGED_PROMPTS, SINGLE_PROMPT, assert_matches_greedy
from helpers.tiny import tiny_model

from efficient.decoding import Sample, generate
from efficient.decoding.drafters import Drafter
from efficient.decoding.drafters.layer_skip import (
    LayerSkipDrafter,
    calibrate_skip_layers,
    estimated_speedup,
    fixed_cost_fraction,
)
from efficient.decoding.speculative import speculative_generate
from efficient.models import forward

NUM_LAYERS = 4
IDENTITY_LAYER = 2


def _model():  # noqa: ANN202
    return tiny_model(0, num_layers=NUM_LAYERS)


def _identity_layer_model():  # noqa: ANN202
    """The 4-layer tiny model with layer 2 adding nothing (o_proj and down_proj zeroed)."""
    graphdef, state = nnx.split(_model())

    def zero(path, x):  # noqa: ANN001, ANN202  (layer parameters are stacked on a leading L axis)
        names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        hit = "layers" in names and ("o_proj" in names or "down_proj" in names)
        return x.at[IDENTITY_LAYER].set(0) if hit else x

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(zero, state))


def _calibration_tokens() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (2, 24), 1, 61, dtype=jnp.int32)


def test_is_a_static_pytree_drafter() -> None:
    drafter = LayerSkipDrafter.create(_model().config, skip_layers=[2, 1])
    assert isinstance(drafter, Drafter)
    assert drafter.skip_layers == (1, 2)
    assert jax.tree_util.tree_leaves(drafter) == []
    assert (drafter.tree_size, drafter.max_depth, drafter.is_chain) == (4, 4, True)


def test_greedy_single_prompt() -> None:
    model = _model()
    drafter = LayerSkipDrafter.create(model.config, skip_layers=(1, 2), length=4)
    out = assert_matches_greedy(model, drafter, SINGLE_PROMPT)
    assert out.stats.row_steps > 0


def test_greedy_ragged_batch_with_stop_token() -> None:
    model = _model()
    drafter = LayerSkipDrafter.create(model.config, skip_layers=(1, 2), length=4)
    # A stop token that the greedy output of row 1 produces at its 6th token (one compile:
    # rows 0 and 2 run on unless they meet it too).
    stop = int(generate(model, RAGGED_PROMPTS, max_new_tokens=24).tokens[1, 5])
    out = assert_matches_greedy(model, drafter, RAGGED_PROMPTS, stop_tokens=[stop])
    assert out.stopped[1] and out.lengths[1] <= 6


def test_greedy_with_stop_threshold() -> None:
    model = _model()
    drafter = LayerSkipDrafter.create(model.config, skip_layers=(0, 3), length=6, stop_threshold=0.5)
    out = assert_matches_greedy(model, drafter, SINGLE_PROMPT)
    proposed = out.stats.proposed_by_depth
    assert len(proposed) == 6 and list(proposed) == sorted(proposed, reverse=True)
    assert proposed[-1] < proposed[0]  # some steps stopped drafting early


def test_identity_layer_drafts_exactly_and_is_calibrated_first() -> None:
    """Skipping a layer that adds nothing drafts exactly the target's tokens: every draft
    is accepted iff the kept layers' cache entries are reused at the right positions."""
    model = _identity_layer_model()
    calibration = calibrate_skip_layers(model, _calibration_tokens(), max_skip=2)
    first = calibration.trace[1]
    assert first.skip_layers == (IDENTITY_LAYER,)
    assert first.agreement == 1.0 and first.overlap == pytest.approx(1.0, abs=1e-5)
    drafter = LayerSkipDrafter.calibrated(model, _calibration_tokens(), max_skip=1)
    assert drafter.skip_layers == (IDENTITY_LAYER,)
    out = assert_matches_greedy(model, drafter, RAGGED_PROMPTS)
    assert out.stats.acceptance_by_depth == (1.0,) * 4


def test_sampling_smoke() -> None:
    model = _model()
    drafter = LayerSkipDrafter.create(model.config, skip_layers=(1,), length=3)
    out = speculative_generate(model, RAGGED_PROMPTS, drafter=drafter, max_new_tokens=12,
                               sampling=Sample(temperature=1.0), key=0)
    assert out.tokens.shape == (3, 12)
    np.testing.assert_array_equal(out.lengths, 12)
    assert out.tokens.min() >= 0 and out.tokens.max() < model.config.vocab_size


def _direct_agreement(model, tokens, lengths, skip_layers) -> float:  # noqa: ANN001
    full, _ = forward(model, tokens)
    skipped, _ = forward(model, tokens, skip_layers=skip_layers)
    agree = np.asarray(jnp.argmax(full, -1) == jnp.argmax(skipped, -1))
    valid = np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None]
    return float(agree[valid].mean())


def test_calibration_agreement_and_choice() -> None:
    model = _model()
    tokens, lengths = _calibration_tokens(), np.array([24, 17])
    calibration = calibrate_skip_layers(model, tokens, length=3, lengths=lengths, width=None, patience=None)
    trace = calibration.trace
    fixed = fixed_cost_fraction(model)
    assert [len(step.skip_layers) for step in trace] == list(range(NUM_LAYERS))
    assert trace[0].speedup == 1.0
    for size, step in enumerate(trace[1:], start=1):
        assert set(trace[size - 1].skip_layers) < set(step.skip_layers)
        assert len(step.candidates) == NUM_LAYERS - size + 1
        assert step.agreement == max(c[1] for c in step.candidates)
        assert step.speedup == pytest.approx(estimated_speedup(step.agreement, size, NUM_LAYERS, 3, fixed))
    # The agreement matches a direct computation with `forward(skip_layers=...)`.
    for step in trace[1:3]:
        assert step.agreement == pytest.approx(_direct_agreement(model, tokens, lengths, step.skip_layers))
    best = max(trace[1:], key=lambda s: s.speedup)
    assert calibration.skip_layers == best.skip_layers and calibration.speedup == best.speedup
    assert 1 <= len(calibration.skip_layers) < NUM_LAYERS
    assert (calibration.length, calibration.num_layers) == (3, NUM_LAYERS)
    LayerSkipDrafter.create(model.config, skip_layers=calibration.skip_layers)  # a valid set


def test_pruned_search_tries_width_layers_and_stops_after_patience() -> None:
    model = _model()
    calibration = calibrate_skip_layers(model, _calibration_tokens(), length=3, width=2, patience=1)
    trace = calibration.trace
    assert len(trace[1].candidates) == NUM_LAYERS
    assert all(len(step.candidates) <= 2 for step in trace[2:])
    # Stopped at the first size that did not improve on the best so far (or at max_skip).
    best = max(range(1, len(trace)), key=lambda i: (trace[i].speedup, -i))
    assert len(trace) - 1 in (best, best + 1, NUM_LAYERS - 1)
    assert calibration.skip_layers == trace[best].skip_layers


def test_fixed_cost_fraction_counts_the_lm_head() -> None:
    model = _model()
    config = model.config
    head = config.vocab_size * config.hidden_size
    layers = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nnx.state(model.layers)))
    # The head (tied or not) and the final norm are read at every step; the layers can be skipped.
    assert head / (head + layers) <= fixed_cost_fraction(model) < (head + 2 * config.hidden_size) / (head + layers)


def test_estimated_speedup() -> None:
    assert estimated_speedup(1.0, 2, 4, 4) == pytest.approx(5 / 3)  # 5 tokens for 1 + 4 * 1/2
    assert estimated_speedup(1.0, 2, 4, 4, 0.5) == pytest.approx(5 / 4)  # draft cost 0.5 + 0.5 * 1/2
    assert estimated_speedup(0.0, 1, 4, 4) == pytest.approx(1 / 4)
    assert estimated_speedup(0.5, 1, 2, 2) == pytest.approx(1.75 / 2)


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(skip_layers=()), "skip_layers"),
    (dict(skip_layers=1), "skip_layers"),
    (dict(skip_layers=(1, 1)), "skip_layers"),
    (dict(skip_layers=(4,)), "skip_layers"),
    (dict(skip_layers=(-1,)), "skip_layers"),
    (dict(skip_layers=(0, 1, 2, 3)), "skip_layers"),
    (dict(skip_layers=(1.0,)), "skip_layers"),
    (dict(skip_layers=(True,)), "skip_layers"),
    (dict(skip_layers=(1,), length=0), "length"),
    (dict(skip_layers=(1,), length=2.0), "length"),
    (dict(skip_layers=(1,), length=10_000), "length"),
    (dict(skip_layers=(1,), stop_threshold=0.0), "stop_threshold"),
    (dict(skip_layers=(1,), stop_threshold=1.0), "stop_threshold"),
    (dict(skip_layers=(1,), stop_threshold="0.5"), "stop_threshold"),
])
def test_create_rejects_bad_input(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LayerSkipDrafter.create(_model().config, **kwargs)


def test_create_and_check_reject_wrong_target() -> None:
    with pytest.raises(TypeError, match="target_config"):
        LayerSkipDrafter.create(object(), skip_layers=(1,))
    drafter = LayerSkipDrafter.create(_model().config, skip_layers=(3,))
    with pytest.raises(ValueError, match="skip_layers"):  # a 2-layer target has no layer 3
        speculative_generate(tiny_model(0), SINGLE_PROMPT, drafter=drafter, max_new_tokens=4)


@pytest.mark.parametrize(("kwargs", "name", "error"), [
    (dict(model=object()), "model", TypeError),
    (dict(model="one-layer"), "num_layers", ValueError),
    (dict(tokens=np.zeros((24,), np.int32)), "tokens", ValueError),
    (dict(tokens=np.full((1, 8), 61, np.int32)), "tokens", ValueError),
    (dict(tokens=np.zeros((1, 8), np.float32)), "tokens", TypeError),
    (dict(max_skip=0), "max_skip", ValueError),
    (dict(max_skip=NUM_LAYERS), "max_skip", ValueError),
    (dict(max_skip=1.5), "max_skip", ValueError),
    (dict(length=0), "length", ValueError),
    (dict(lengths=np.array([24])), "lengths", ValueError),
    (dict(lengths=np.array([0, 3])), "lengths", ValueError),
    (dict(lengths=np.array([25, 3])), "lengths", ValueError),
])
def test_calibrate_rejects_bad_input(kwargs: dict, name: str, error: type[Exception]) -> None:
    args = dict(model=_model(), tokens=_calibration_tokens())
    if kwargs.get("model") == "one-layer":
        kwargs = dict(kwargs, model=tiny_model(0, num_layers=1))
    args.update(kwargs)
    with pytest.raises(error, match=name):
        calibrate_skip_layers(args.pop("model"), args.pop("tokens"), **args)


def test_calibration_warns_exactly_when_no_skip_is_estimated_to_pay() -> None:
    import warnings

    model = _model()
    for tokens in (_calibration_tokens(), _calibration_tokens()[:, :8]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            calibration = calibrate_skip_layers(model, tokens, length=3, width=2, patience=1)
        warned = [w for w in caught if issubclass(w.category, RuntimeWarning) and "no skip set" in str(w.message)]
        assert bool(warned) == (calibration.speedup <= 1.0)
