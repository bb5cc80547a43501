"""Sampling rules as frozen dataclasses, applied to float32 logits.

`Greedy()` takes the argmax. `Sample(temperature, top_k, top_p, min_p)`
combines the usual filters, applied in that order to the tempered
distribution: top-k (keep the k largest), top-p / nucleus (Holtzman et al.,
2020: the smallest prefix of the sorted distribution with mass >= p), min-p
(Nguyen et al., 2024: keep tokens with p >= min_p * p_max). The most likely
token always survives. `Sample(temperature=0)` is greedy.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Always the most likely token."""

    @property
    def is_greedy(self) -> bool:
        return True

    def filtered_logits(self, logits: Float[Array, "... V"]) -> Float[Array, "... V"]:
        """A one-hot distribution on the argmax, as log-probabilities."""
        best = jnp.argmax(logits, axis=-1)
        return jnp.where(jax.nn.one_hot(best, logits.shape[-1], dtype=bool), 0.0, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class Sample:
    """Temperature sampling with optional top-k, top-p and min-p filters."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"Sample.{name} must be a real number, got {type(value).__name__} {value!r}")
        if not isinstance(self.top_k, numbers.Integral) or isinstance(self.top_k, bool):
            raise TypeError(f"Sample.top_k must be an int (0 disables it), got {type(self.top_k).__name__} "
                            f"{self.top_k!r}")
        for name in ("temperature", "top_p", "min_p"):  # plain Python numbers: the rule is hashed by jit
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "top_k", int(self.top_k))
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"Sample.temperature must be finite and >= 0 (0: greedy), got {self.temperature!r}")
        if self.top_k < 0:
            raise ValueError(f"Sample.top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sample.top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"Sample.min_p must be in [0, 1) (0 disables it), got {self.min_p!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def filtered_logits(self, logits: Float[Array, "... V"]) -> Float[Array, "... V"]:
        """Tempered, filtered logits (-inf where removed); softmax gives the sampling law."""
        if self.is_greedy:
            return Greedy().filtered_logits(logits)
        logits = logits.astype(jnp.float32) / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p < 1.0:
            order = jnp.argsort(-logits, axis=-1)
            sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            keep_sorted = mass_before < self.top_p
            keep = _unsort(keep_sorted, order)
            logits = jnp.where(keep, logits, -jnp.inf)
        if self.min_p > 0.0:
            probs = jax.nn.softmax(logits, axis=-1)
            threshold = self.min_p * jnp.max(probs, axis=-1, keepdims=True)
            logits = jnp.where(probs < threshold, -jnp.inf, logits)
        return logits


def _unsort(values: jax.Array, order: jax.Array) -> jax.Array:
    """Inverse of take_along_axis(x, order, -1) for any leading shape."""
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(values, inverse, axis=-1)


SamplingRule = Greedy | Sample


def sample_tokens(
    rule: SamplingRule, logits: Float[Array, "B V"], key: jax.Array
) -> Int[Array, " B"]:
    """One token per row under `rule` (the key is unused for greedy rules)."""
    if rule.is_greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, rule.filtered_logits(logits), axis=-1).astype(jnp.int32)


def sampling_from_dict(params: dict[str, Any]) -> SamplingRule:
    """Build a rule from a plain dict (configs); unknown keys raise ValueError."""
    params = dict(params)
    kind = params.pop("kind", "greedy" if not params else "sample")
    if kind == "greedy":
        if params:
            raise ValueError(f"greedy sampling takes no parameters, got {sorted(params)}")
        return Greedy()
    if kind != "sample":
        raise ValueError(f"unknown sampling kind {kind!r}; use 'greedy' or 'sample'")
    allowed = {f.name for f in dataclasses.fields(Sample)}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"unknown sampling parameters {unknown}; allowed: {sorted(allowed)}")
    return Sample(**params)
