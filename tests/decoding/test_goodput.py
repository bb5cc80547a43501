"""Draft width by goodput (SmartSpec): the choice, its refusal to lose to plain decoding, the
measured verification costs, and bad arguments."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tiny import tiny_model

from efficient.decoding.goodput import choose_width, verification_seconds
from efficient.decoding.online_width import OnlineWidth


def test_the_width_of_largest_expected_tokens_per_second_is_chosen() -> None:
    seconds = {0: 1.0, 2: 1.2, 8: 2.0}
    choice = choose_width({2: 1.8, 8: 2.5}, seconds, draft_seconds=0.1)
    assert choice.goodput == pytest.approx({0: 1.0, 2: 1.8 / 1.3, 8: 2.5 / 2.1})
    assert choice.width == 2 and choice.seconds[2] == pytest.approx(1.3) and choice.seconds[0] == 1.0


def test_plain_decoding_is_chosen_when_no_width_pays_by_the_margin() -> None:
    choice = choose_width({1: 1.1, 4: 1.5}, {0: 1.0, 1: 1.2, 4: 1.6})
    assert choice.width == 0 and choice.expected[0] == 1.0
    assert choose_width({2: 1.04}, {0: 1.0, 2: 1.0}).width == 0  # 4% better: within the 5% margin
    assert choose_width({2: 1.04}, {0: 1.0, 2: 1.0}, margin=0.0).width == 2


def test_verification_is_measured_at_every_width() -> None:
    seconds = verification_seconds(tiny_model(), (0, 3, 7), batch=2, context=16, iters=2)
    assert set(seconds) == {0, 3, 7} and all(s > 0 for s in seconds.values())


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="width 0"):
        choose_width({2: 2.0}, {2: 1.0})
    with pytest.raises(ValueError, match=r"missing for widths \[4\]"):
        choose_width({2: 2.0}, {0: 1.0, 2: 1.0, 4: 1.0})
    with pytest.raises(ValueError, match="margin"):
        choose_width({2: 2.0}, {0: 1.0, 2: 1.0}, margin=1.5)
    with pytest.raises(ValueError, match="draft_seconds"):
        choose_width({2: 2.0}, {0: 1.0, 2: 1.0}, draft_seconds=-1.0)
    model = tiny_model()
    with pytest.raises(ValueError, match="widths"):
        verification_seconds(model, (-1,), batch=1, context=8)
    with pytest.raises(ValueError, match="context"):
        verification_seconds(model, (1,), batch=1, context=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        verification_seconds(model, (8,), batch=1, context=model.config.max_position_embeddings)


def test_online_width_follows_the_acceptance_it_sees() -> None:
    """r = 1 picks the table's best width; low acceptance moves rows to plain steps, from which r
    relaxes back toward 1 so that drafting is tried again."""
    online = OnlineWidth.from_choice(choose_width({4: 2.0, 8: 3.0}, {0: 1.0, 4: 1.3, 8: 1.8}))
    assert online.widths == (0, 4, 8)
    assert online.choose(jnp.asarray([1.0, 0.1, 0.5])).tolist() == [8, 0, 4]
    scale = jnp.asarray([1.0, 1.0])
    after = online.observe(scale, jnp.asarray([4, 4]), jnp.asarray([0, 3]))  # 0 and 3x the expected 1 draft
    np.testing.assert_allclose(after, [0.7, 1.6], rtol=1e-6)
    low = jnp.asarray([0.2])
    relaxed = online.observe(low, jnp.asarray([0]), jnp.asarray([0]))
    np.testing.assert_allclose(relaxed, [0.2 + 0.05 * 0.8], rtol=1e-6)
    steps = 0
    while int(online.choose(low)[0]) == 0:
        low = online.observe(low, jnp.asarray([0]), jnp.asarray([0]))
        steps += 1
    assert 3 <= steps < 40
    with pytest.raises(ValueError, match="width 0"):
        OnlineWidth.from_choice(dataclasses.replace(choose_width({4: 2.0}, {0: 1.0, 4: 1.0}), seconds={4: 1.0}))
