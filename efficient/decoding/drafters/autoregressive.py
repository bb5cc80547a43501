"""Autoregressive chain drafting, shared by model drafters (a draft model, the
target with layers skipped).

The chain is drafted one token at a time under the sampling rule: greedy rules
take the argmax (point masses), sampling rules draw from the rule's filtered
law of the draft logits and return those laws for lossless verification.

SpecDec++ (Huang et al. 2024) stops a row's speculation once the estimated
probability that at least one drafted token is rejected exceeds a threshold:
1 - prod_j a_j > threshold, where a_j estimates the acceptance probability of
token j. Without a trained acceptance head we use the draft's own confidence,
a_j = q_j(d_j) (the probability the draft gave its token). The loop ends when
every row has stopped, so a confident batch drafts long and a doubtful one
short.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from efficient.decoding.sampling import SamplingRule
from efficient.decoding.verify import target_probs

# step(carry, tokens [B], positions [B]) -> (logits [B, V], carry)
DraftStep = Callable[[object, Int[Array, " B"], Int[Array, " B"]], tuple[Float[Array, "B V"], object]]


def draft_chain(
    step: DraftStep,
    carry: object,
    first_logits: Float[Array, "B V"],
    root_position: Int[Array, " B"],
    length: int,
    rule: SamplingRule,
    key: jax.Array,
    active: Bool[Array, " B"],
    stop_threshold: float | None = None,
) -> tuple[Int[Array, "B D"], Int[Array, " B"], Float[Array, "B D V"] | None, object]:
    """Draft up to `length` tokens after the root; `first_logits` predict the first.

    Returns (tokens, number of drafted tokens per row, proposal laws or None for
    greedy, the step carry)."""
    b, v = first_logits.shape
    greedy = rule.is_greedy

    def choose(logits: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        if greedy:
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            probs = target_probs(rule, logits[:, None])[:, 0]
            token = jax.random.categorical(k, jnp.log(probs), axis=-1).astype(jnp.int32)
        confidence = jnp.take_along_axis(probs, token[:, None], axis=1)[:, 0]
        return token, probs, confidence

    keys = jax.random.split(key, length)
    token, probs, confidence = choose(first_logits, keys[0])
    tokens = jnp.zeros((b, length), jnp.int32).at[:, 0].set(token)
    laws = None if greedy else jnp.zeros((b, length, v), jnp.float32).at[:, 0].set(probs)
    all_accepted = confidence
    alive = active if stop_threshold is None else active & (1.0 - all_accepted <= stop_threshold)
    counts = jnp.where(active, 1, 0).astype(jnp.int32)

    def cond(state):  # noqa: ANN001, ANN202
        j, _, _, _, _, alive, _, _ = state
        return (j < length) & jnp.any(alive)

    def body(state):  # noqa: ANN001, ANN202
        j, carry, tokens, laws, counts, alive, all_accepted, previous = state
        positions = jnp.where(active, root_position + j, -1)
        logits, carry = step(carry, previous, positions)
        token, probs, confidence = choose(logits, keys[j])
        tokens = tokens.at[:, j].set(token)
        if laws is not None:
            laws = laws.at[:, j].set(probs)
        counts = counts + alive.astype(jnp.int32)
        all_accepted = all_accepted * confidence
        if stop_threshold is not None:
            alive = alive & (1.0 - all_accepted <= stop_threshold)
        return j + 1, carry, tokens, laws, counts, alive, all_accepted, token

    state = (jnp.int32(1), carry, tokens, laws, counts, alive, all_accepted, token)
    _, carry, tokens, laws, counts, _, _, _ = jax.lax.while_loop(cond, body, state)
    return tokens, counts, laws, carry
