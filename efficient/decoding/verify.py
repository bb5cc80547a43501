"""Acceptance of a draft tree from one target forward over it.

Given the target's logits at the root and at every node (index 0 = root, node
i at 1 + i), `accept_tree` walks the tree from the root and returns the
accepted path and the token that follows it:

- greedy rules: a node matches iff its token is the target's argmax at its
  parent; the accepted path is the deepest node whose ancestors all match
  (the first such node in order on ties), then the argmax after it. Output
  equals plain greedy decoding. Computed without a loop over nodes.
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
from efficient.decoding.tree import DraftTree, ancestry


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
    *,
    ancestors: Bool[Array, "B W W"] | None = None,
    depths: Int[Array, "B W"] | None = None,
) -> Verdict:
    """Walk the tree from the root (see the module docstring); `valid` is the tree's
    existence mask after `ancestry` (missing nodes are never accepted), whose
    `ancestors` and `depths` the greedy rule reuses when given."""
    b, t, v = logits.shape
    w = t - 1
    if rule.is_greedy and typical is None:
        if ancestors is None or depths is None:
            ancestors, depths, _ = ancestry(tree)
        return _accept_greedy(logits, tree, valid, ancestors, depths)
    probs = target_probs(rule, logits)  # B T V
    accept_key, final_key = jax.random.split(key)
    uniforms = jax.random.uniform(accept_key, (w, b))
    rows = jnp.arange(b)

    def step(carry, i):  # noqa: ANN001, ANN202
        current, residual, path, count = carry
        token = tree.tokens[:, i]
        child = valid[:, i] & (tree.parents[:, i] + 1 == current)
        if typical is not None:
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
        if typical is not None:
            return (new_current, residual, path, count), None
        at_node = probs[:, i + 1]
        residual = jnp.where(accepted[:, None], at_node, jnp.where(child[:, None], rejected, residual))
        return (new_current, residual, path, count), None

    init = (jnp.zeros((b,), jnp.int32), probs[:, 0], jnp.full((b, w), -1, jnp.int32),
            jnp.zeros((b,), jnp.int32))
    (current, residual, path, count), _ = jax.lax.scan(step, init, jnp.arange(w))
    if typical is not None:
        final_logits = jnp.log(probs[rows, current])
        next_token = jax.random.categorical(final_key, final_logits, axis=-1).astype(jnp.int32)
    else:
        next_token = jax.random.categorical(final_key, jnp.log(residual), axis=-1).astype(jnp.int32)
    return Verdict(path=path, num_accepted=count, next_token=next_token)


def _accept_greedy(logits: Float[Array, "B T V"], tree: DraftTree, valid: Bool[Array, "B W"],
                   ancestors: Bool[Array, "B W W"], depths: Int[Array, "B W"]) -> Verdict:
    """Deepest node whose whole ancestry matches the target's argmax (vectorised)."""
    b, t, _ = logits.shape
    w = t - 1
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # B T
    at_parent = jnp.take_along_axis(best, tree.parents + 1, axis=1)  # argmax after each node's parent
    match = valid & (tree.tokens == at_parent)
    on_path = match & ~jnp.any(ancestors & ~match[:, None, :], axis=-1)  # B W
    score = jnp.where(on_path, depths * (w + 1) - jnp.arange(w)[None, :], -1)  # deepest, then first
    chosen = jnp.argmax(score, axis=1)
    count = jnp.where(jnp.any(on_path, axis=1), jnp.take_along_axis(depths, chosen[:, None], 1)[:, 0], 0)
    chosen_anc = jnp.take_along_axis(ancestors, chosen[:, None, None], axis=1)[:, 0]  # B W
    # path[d] = the chosen node's ancestor at depth d + 1.
    level = chosen_anc[:, None, :] & (depths[:, None, :] == jnp.arange(1, w + 1)[None, :, None])  # B D W
    path = jnp.where(jnp.any(level, axis=-1) & (jnp.arange(w)[None, :] < count[:, None]),
                     jnp.argmax(level, axis=-1), -1).astype(jnp.int32)
    next_token = jnp.take_along_axis(best, jnp.where(count > 0, chosen + 1, 0)[:, None], axis=1)[:, 0]
    return Verdict(path=path, num_accepted=count.astype(jnp.int32), next_token=next_token)
