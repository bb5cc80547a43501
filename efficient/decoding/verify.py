"""Acceptance of a draft tree from one target forward over it.

Given the target's logits at the root and at every node (index 0 = root, node
i at 1 + i), `accept_tree` walks the tree from the root and returns the
accepted path and the token that follows it:

- greedy rules: a child is accepted iff its token is the target's argmax at
  its parent (the first matching child at each step: drafters should give
  siblings distinct tokens, then the path is the longest match), then the
  argmax after it. Output equals plain greedy decoding.
- sampling rules, lossless: recursive rejection sampling (SpecInfer's
  multi-step speculative sampling; Leviathan et al. 2023 and Chen et al.
  2023 for a chain). At the current node the children are tried in order:
  child x with proposal law q is accepted with probability
  min(1, r(x) / q(x)), r starting as the target law p at the node; on
  rejection r <- normalise(max(r - q, 0)). The token after the path is drawn
  from r. With point-mass proposals (deterministic drafters) this is "try x
  with probability r(x), else remove it"; with siblings sampled without
  replacement (Recursive Speculative Decoding, Jeon et al. 2024) the drafter
  supplies each sibling's renormalised law. Either way every emitted token is
  distributed exactly as the target's (filtered) law.
- typical acceptance (Medusa, Cai et al. 2024), explicitly lossy: a child is
  accepted iff p(x) > min(epsilon, delta * exp(-H(p))); the following token
  is sampled from p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from efficient.decoding.sampling import SamplingRule
from efficient.decoding.tree import DraftTree


@dataclasses.dataclass(frozen=True)
class TypicalAcceptance:
    """Medusa's typical acceptance (lossy): accept x iff p(x) > min(epsilon, delta * exp(-H(p)))."""

    epsilon: float = 0.09
    delta: float = 0.3

    def __post_init__(self) -> None:
        if not 0 < self.epsilon <= 1:
            raise ValueError(f"TypicalAcceptance.epsilon must be in (0, 1], got {self.epsilon!r}")
        if not self.delta > 0:
            raise ValueError(f"TypicalAcceptance.delta must be > 0, got {self.delta!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Verdict:
    path: Int[Array, "B W"]  # accepted nodes (0-based node ids) in depth order; -1 after the end
    num_accepted: Int[Array, " B"]
    next_token: Int[Array, " B"]  # the target's token after the accepted path


def target_probs(rule: SamplingRule, logits: Float[Array, "B T V"]) -> Float[Array, "B T V"]:
    """The law each emitted token must follow: softmax of the rule's filtered logits."""
    return jax.nn.softmax(rule.filtered_logits(logits.astype(jnp.float32)), axis=-1)


def accept_tree(
    rule: SamplingRule,
    logits: Float[Array, "B T V"],
    tree: DraftTree,
    valid: Bool[Array, "B W"],
    key: jax.Array,
    typical: TypicalAcceptance | None = None,
) -> Verdict:
    """Walk the tree from the root (see the module docstring); `valid` is the tree's
    existence mask after `ancestry` (missing nodes are never accepted)."""
    b, t, v = logits.shape
    w = t - 1
    greedy = rule.is_greedy and typical is None
    if greedy:
        best = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # B T
        probs = None
    else:
        probs = target_probs(rule, logits)  # B T V
    accept_key, final_key = jax.random.split(key)
    uniforms = jax.random.uniform(accept_key, (w, b))
    rows = jnp.arange(b)

    def step(carry, i):  # noqa: ANN001, ANN202
        current, residual, path, count = carry
        token = tree.tokens[:, i]
        child = valid[:, i] & (tree.parents[:, i] + 1 == current)
        if greedy:
            ok = token == best[rows, current]
        elif typical is not None:
            p = probs[rows, current]
            entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
            threshold = jnp.minimum(typical.epsilon, typical.delta * jnp.exp(-entropy))
            ok = p[rows, token] > threshold
        else:
            q = (jax.nn.one_hot(token, v, dtype=jnp.float32) if tree.probs is None
                 else tree.probs[:, i].astype(jnp.float32))
            q_x = q[rows, token]
            ok = uniforms[i] * q_x < residual[rows, token]
            leftover = jnp.maximum(residual - q, 0.0)
            mass = jnp.sum(leftover, axis=-1, keepdims=True)
            # A rejection has probability 0 when the leftover is empty; keep r then.
            rejected = jnp.where(mass > 0, leftover / jnp.where(mass > 0, mass, 1.0), residual)
        accepted = child & ok
        new_current = jnp.where(accepted, i + 1, current)
        path = path.at[rows, jnp.where(accepted, count, w)].set(i, mode="drop")
        count = count + accepted.astype(jnp.int32)
        if greedy or typical is not None:
            return (new_current, residual, path, count), None
        at_node = probs[:, i + 1]
        residual = jnp.where(accepted[:, None], at_node, jnp.where(child[:, None], rejected, residual))
        return (new_current, residual, path, count), None

    start_residual = jnp.zeros((b, v), jnp.float32) if probs is None else probs[:, 0]
    init = (jnp.zeros((b,), jnp.int32), start_residual, jnp.full((b, w), -1, jnp.int32),
            jnp.zeros((b,), jnp.int32))
    (current, residual, path, count), _ = jax.lax.scan(step, init, jnp.arange(w))
    if greedy:
        next_token = best[rows, current]
    elif typical is not None:
        final_logits = jnp.log(probs[rows, current])
        next_token = jax.random.categorical(final_key, final_logits, axis=-1).astype(jnp.int32)
    else:
        next_token = jax.random.categorical(final_key, jnp.log(residual), axis=-1).astype(jnp.int32)
    return Verdict(path=path, num_accepted=count, next_token=next_token)
