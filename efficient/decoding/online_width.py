"""Per-step draft width by goodput, with acceptance re-estimated online (SmartSpec, Liu et al. 2024).

    online = OnlineWidth.from_choice(choose_width(expected, seconds))   # the start-up table
    drafter = EagleDrafter.create(target, model, vocab, tree_size=32, online=online)

Kept apart from `goodput.py` (which times the target) so that drafters can import it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class OnlineWidth:
    """Per-step width by goodput with acceptance re-estimated online (SmartSpec).

    The start-up table (`WidthChoice`: step seconds and calibrated tokens per step by
    width) is rescaled per row by r, an exponential moving average of accepted drafts
    over the calibrated expectation at the width used: tokens(w) = 1 + r (E_w - 1). Each
    step a row takes the width of largest tokens(w) / seconds(w), or 0 (no draft: a
    plain step) unless one beats plain decoding by `margin`. While a row does not
    speculate, r relaxes toward 1 by `recovery` per step, so a row that stopped
    drafting tries again after a while (acceptance varies along a text)."""

    widths: tuple[int, ...]  # ascending, starting at 0
    seconds: tuple[float, ...]  # per step at each width, drafting included
    expected: tuple[float, ...]  # calibrated tokens per step at each width (1 at width 0)
    margin: float = 0.05
    rate: float = 0.3  # EMA weight of one step's observation
    recovery: float = 0.05

    @staticmethod
    def from_choice(choice: Any, margin: float = 0.05) -> OnlineWidth:
        """From a `goodput.WidthChoice` (step seconds and tokens per step by width)."""
        widths = tuple(sorted(choice.seconds))
        if widths[0] != 0:
            raise ValueError("the goodput table must include width 0 (a plain step)")
        return OnlineWidth(widths=widths, seconds=tuple(float(choice.seconds[w]) for w in widths),
                           expected=tuple(float(choice.expected[w]) for w in widths), margin=margin)

    def choose(self, scale: Float[Array, " B"]) -> Int[Array, " B"]:
        """Width per row for the acceptance scale r [B]."""
        expected = jnp.asarray(self.expected, jnp.float32)
        tokens = 1.0 + scale[:, None] * (expected[None, :] - 1.0)  # B widths
        goodput = tokens / jnp.asarray(self.seconds, jnp.float32)[None, :]
        best = jnp.argmax(goodput, axis=1)
        pays = jnp.take_along_axis(goodput, best[:, None], axis=1)[:, 0] > goodput[:, 0] * (1 + self.margin)
        return jnp.where(pays, jnp.asarray(self.widths, jnp.int32)[best], 0)

    def observe(self, scale: Float[Array, " B"], width: Int[Array, " B"],
                accepted: Int[Array, " B"]) -> Float[Array, " B"]:
        """The scale after a step at `width` that accepted `accepted` drafted tokens."""
        widths = jnp.asarray(self.widths, jnp.int32)
        slot = jnp.argmax(widths[None, :] == width[:, None], axis=1)
        gain = jnp.asarray(self.expected, jnp.float32)[slot] - 1.0
        observed = accepted.astype(jnp.float32) / jnp.maximum(gain, 1e-3)
        speculated = (1 - self.rate) * scale + self.rate * observed
        relaxed = scale + self.recovery * (1.0 - scale)
        return jnp.clip(jnp.where(width > 0, speculated, relaxed), 0.0, 4.0)
