"""Draft width chosen by measured goodput (SmartSpec, Liu et al. 2024).

    seconds = verification_seconds(model, (0, 1, 2, 4, 8, 16), batch=1, context=256)
    choice = choose_width({w: expected_tokens(w) for w in seconds}, seconds, draft_seconds=0.002)

Speculation pays only when the tokens a verification is expected to emit
outweigh what verifying w draft tokens costs on this device at this batch
size: goodput(w) = E[tokens | w] / (t_verify(w) + t_draft), with w = 0 a plain
decode step (E = 1, no drafting). The cost t_verify is measured at start-up
(one target forward over 1 + w tokens against a cache holding `context`
tokens, as the speculative loop runs it); E comes from the drafter's measured
acceptance. The width of largest goodput is chosen, and 0 (do not speculate)
when no width beats plain decoding, so the choice is never slower than greedy
by its own estimate.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from efficient.cache.dense import DenseKVCache
from efficient.eval.timing import median_seconds
from efficient.models.checks import check_model
from efficient.models.forward import forward


@dataclasses.dataclass(frozen=True)
class WidthChoice:
    width: int  # 0: plain decoding pays best
    seconds: dict[int, float]  # per step: verification of 1 + w tokens (+ drafting for w > 0)
    expected: dict[int, float]  # tokens per step
    goodput: dict[int, float]  # expected tokens per second

    def as_dict(self) -> dict[str, object]:
        return {"width": self.width, "seconds": self.seconds, "expected": self.expected, "goodput": self.goodput}


def verification_seconds(model: object, widths: Sequence[int], *, batch: int, context: int,
                         iters: int = 5) -> dict[int, float]:
    """Median seconds of one target forward over 1 + w tokens (a tree's ancestor mask: a
    chain) against a dense cache already holding `context` tokens, per width w."""
    config = check_model(model, "verification_seconds")
    if not widths or any(not isinstance(w, int) or w < 0 for w in widths):
        raise ValueError(f"widths must be non-negative ints, got {widths!r}")
    for name, value in (("batch", batch), ("context", context), ("iters", iters)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    capacity = context + max(widths) + 1
    if capacity > config.max_position_embeddings:
        raise ValueError(f"context {context} + widest tree {max(widths)} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings}")
    graphdef, params = nnx.split(model)
    cache = DenseKVCache.for_model(config, batch, capacity)
    cache = cache.truncate(jnp.full((batch,), context, jnp.int32))  # attention reads `context` keys

    @jax.jit
    def step(params, tokens, positions, tree_mask, cache):  # noqa: ANN001, ANN202
        logits, cache = forward(nnx.merge(graphdef, params), tokens, positions=positions, cache=cache,
                                tree_mask=tree_mask)
        return logits, cache

    inputs = {}
    for w in widths:
        t = w + 1
        inputs[w] = (jnp.ones((batch, t), jnp.int32),
                     jnp.broadcast_to(context + jnp.arange(t, dtype=jnp.int32), (batch, t)),
                     jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t)))
        jax.block_until_ready(step(params, *inputs[w], cache))  # compile
    # Rounds that time every width once, so that a slow spell of a shared machine hits all widths.
    times: dict[int, list[float]] = {w: [] for w in widths}
    for _ in range(iters):
        for w in widths:
            times[w].append(median_seconds(step, params, *inputs[w], cache, warmup=0, iters=1))
    return {w: statistics.median(t) for w, t in times.items()}


def choose_width(expected: Mapping[int, float], seconds: Mapping[int, float],
                 draft_seconds: float = 0.0, margin: float = 0.05) -> WidthChoice:
    """The width of largest expected tokens per second, if that beats plain decoding by more
    than `margin` (relative; timings on a shared CPU vary by a few percent), else 0.
    `seconds[0]` (a plain step) is required and `expected[0]` is 1 whatever is passed."""
    if 0 not in seconds:
        raise ValueError("seconds must include width 0 (a plain decode step), the baseline every width must beat")
    missing = sorted(set(seconds) - set(expected) - {0})
    if missing:
        raise ValueError(f"expected tokens missing for widths {missing}")
    if draft_seconds < 0:
        raise ValueError(f"draft_seconds must be >= 0, got {draft_seconds!r}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    step = {w: float(s) + (draft_seconds if w else 0.0) for w, s in seconds.items()}
    tokens = {w: (1.0 if w == 0 else float(expected[w])) for w in seconds}
    goodput = {w: tokens[w] / step[w] for w in seconds}
    best = max(sorted(goodput), key=lambda w: goodput[w])
    if goodput[best] <= goodput[0] * (1 + margin):
        best = 0
    return WidthChoice(width=best, seconds=step, expected=tokens, goodput=goodput)
