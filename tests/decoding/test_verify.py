"""The verifier: greedy acceptance, lossless rejection sampling over chains and trees
(statistical, fixed seeds), typical acceptance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from efficient.decoding import Greedy, Sample
from efficient.decoding.tree import DraftTree, ancestry, chain, template_parents
from efficient.decoding.verify import TypicalAcceptance, accept_tree, target_probs

V = 6


def _tree(tokens, parents, valid=None, probs=None) -> DraftTree:  # noqa: ANN001
    tokens = jnp.asarray(tokens, jnp.int32)
    return DraftTree(tokens=tokens, parents=jnp.asarray(parents, jnp.int32),
                     valid=jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid),
                     probs=probs)


def _accept(rule, logits, tree, key=0, typical=None):  # noqa: ANN001, ANN202
    _, _, valid = ancestry(tree)
    return accept_tree(rule, jnp.asarray(logits, jnp.float32), tree, valid, jax.random.key(key), typical)


def _one_hot_logits(best: list[int]) -> np.ndarray:
    """[1, T, V] logits whose argmax at verify index t is best[t]."""
    logits = np.zeros((1, len(best), V), np.float32)
    for t, b in enumerate(best):
        logits[0, t, b] = 5.0
    return logits


def test_greedy_accepts_longest_matching_path_in_a_tree() -> None:
    # root -> {0: tok 1, 1: tok 2}; node 0 -> {2: tok 3}; node 1 -> {3: tok 4, 4: tok 5}
    tree = _tree([[1, 2, 3, 4, 5]], [[-1, -1, 0, 1, 1]])
    # Target argmax: root 2 (node 1 matches), node 1 -> 5 (node 4 matches), node 4 -> 0.
    logits = _one_hot_logits([2, 0, 0, 0, 0, 0])
    logits[0, 2, 5] = 9.0  # at node 1 (index 2)
    verdict = _accept(Greedy(), logits, tree)
    assert int(verdict.num_accepted[0]) == 2
    assert verdict.path[0, :2].tolist() == [1, 4]
    assert int(verdict.next_token[0]) == 0


def test_greedy_rejects_everything_and_ignores_missing_nodes() -> None:
    tree = _tree([[3, 3]], [[-1, 0]], valid=[[False, True]])
    verdict = _accept(Greedy(), _one_hot_logits([3, 3, 3]), tree)
    assert int(verdict.num_accepted[0]) == 0  # node 0 missing, so node 1 (its child) is too
    assert int(verdict.next_token[0]) == 3


def test_greedy_accepts_a_full_chain_and_returns_the_bonus_token() -> None:
    tree = chain(jnp.asarray([[1, 2, 3]]), jnp.asarray([3]))
    verdict = _accept(Greedy(), _one_hot_logits([1, 2, 3, 4]), tree)
    assert int(verdict.num_accepted[0]) == 3 and int(verdict.next_token[0]) == 4


def _law(seed: int, rows: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, V)).astype(np.float32) * 1.5


def _emitted_first(verdict, tree) -> np.ndarray:  # noqa: ANN001
    """The first emitted token: the first accepted node's token, else the next token."""
    first_node = verdict.path[:, 0]
    token_of_node = jnp.take_along_axis(tree.tokens, jnp.maximum(first_node, 0)[:, None], axis=1)[:, 0]
    return np.asarray(jnp.where(verdict.num_accepted > 0, token_of_node, verdict.next_token))


def _chi2_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(samples, minlength=probs.size)
    probs = np.asarray(probs, np.float64)
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token with zero target probability was emitted"
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    return float(stats.chisquare(counts[keep], expected).pvalue)


N = 20000


def _batched(tree_fn, logits_row: np.ndarray, rule, seed: int):  # noqa: ANN001, ANN202
    """Run accept_tree on N independent rows: drafts drawn per row by tree_fn(key)."""
    keys = jax.random.split(jax.random.key(seed), N)
    trees = jax.vmap(tree_fn)(keys)
    trees = jax.tree_util.tree_map(lambda x: x[:, 0] if x.ndim >= 2 else x, trees)
    logits = jnp.broadcast_to(jnp.asarray(logits_row), (N, *logits_row.shape))
    _, _, valid = ancestry(trees)
    verdict = accept_tree(rule, logits, trees, valid, jax.random.key(seed + 1))
    return trees, verdict


@pytest.mark.parametrize("rule", [Sample(temperature=1.0), Sample(temperature=0.7, top_k=4, top_p=0.9)])
def test_chain_speculative_sampling_emits_the_target_law(rule) -> None:  # noqa: ANN001
    target = np.stack([_law(0)[0], _law(1)[0], _law(2)[0]])  # T = 3: root + 2 nodes
    draft_logits = _law(7)[0]
    q = np.asarray(jax.nn.softmax(jnp.asarray(draft_logits)))

    def tree_fn(key):  # noqa: ANN001, ANN202
        tokens = jax.random.categorical(key, jnp.log(jnp.asarray(q)), shape=(2,))
        probs = jnp.broadcast_to(jnp.asarray(q), (1, 2, V))
        return chain(tokens[None].astype(jnp.int32), jnp.asarray([2]), probs)

    trees, verdict = _batched(tree_fn, target, rule, seed=3)
    p_root = np.asarray(target_probs(rule, jnp.asarray(target[None, :1])))[0, 0]
    assert _chi2_pvalue(_emitted_first(verdict, trees), p_root) > 1e-3
    # Accepted drafts at depth 1 also follow the law at node 0 for the second token.
    accepted = np.asarray(verdict.num_accepted) >= 1
    second = np.where(np.asarray(verdict.num_accepted) >= 2, np.asarray(trees.tokens[:, 1]),
                      np.asarray(verdict.next_token))
    # Here the target law after the first draft token (logits at node 0) is the same whatever it is.
    p_node0 = np.asarray(target_probs(rule, jnp.asarray(target[None, 1:2])))[0, 0]
    assert _chi2_pvalue(second[accepted], p_node0) > 1e-3


@pytest.mark.parametrize("without_replacement", [False, True])
def test_tree_recursive_rejection_sampling_emits_the_target_law(without_replacement: bool) -> None:
    rule = Sample(temperature=1.0)
    parents = template_parents(((3,),))  # three siblings below the root
    target = np.stack([_law(11)[0]] + [_law(12 + i)[0] for i in range(3)])
    q = np.asarray(jax.nn.softmax(jnp.asarray(_law(5)[0])))

    def tree_fn(key):  # noqa: ANN001, ANN202
        if without_replacement:  # Gumbel-top-k: 3 distinct tokens, each sibling's law renormalised
            gumbel = jax.random.gumbel(key, (V,)) + jnp.log(jnp.asarray(q))
            tokens = jnp.argsort(-gumbel)[:3].astype(jnp.int32)
            removed = jnp.cumsum(jax.nn.one_hot(tokens, V), axis=0) - jax.nn.one_hot(tokens, V)
            laws = jnp.asarray(q)[None, :] * (1 - removed)
            laws = laws / laws.sum(-1, keepdims=True)
        else:
            tokens = jax.random.categorical(key, jnp.log(jnp.asarray(q)), shape=(3,)).astype(jnp.int32)
            laws = jnp.broadcast_to(jnp.asarray(q), (3, V))
        return DraftTree(tokens=tokens[None], parents=jnp.asarray(parents)[None], valid=jnp.ones((1, 3), bool),
                         probs=laws[None])

    trees, verdict = _batched(tree_fn, target, rule, seed=5)
    p_root = np.asarray(target_probs(rule, jnp.asarray(target[None, :1])))[0, 0]
    assert _chi2_pvalue(_emitted_first(verdict, trees), p_root) > 1e-3
    assert float(np.mean(np.asarray(verdict.num_accepted))) > 0.3  # the tree does get accepted


def test_point_mass_tree_sampling_emits_the_target_law() -> None:
    """Deterministic drafters (n-gram, recycling) propose fixed siblings: still exact."""
    rule = Sample(temperature=1.0)
    target = np.stack([_law(21)[0], _law(22)[0], _law(23)[0]])

    def tree_fn(key):  # noqa: ANN001, ANN202
        del key
        return DraftTree(tokens=jnp.asarray([[2, 4]], jnp.int32), parents=jnp.asarray([[-1, -1]], jnp.int32),
                         valid=jnp.ones((1, 2), bool), probs=None)

    trees, verdict = _batched(tree_fn, target, rule, seed=9)
    p_root = np.asarray(target_probs(rule, jnp.asarray(target[None, :1])))[0, 0]
    assert _chi2_pvalue(_emitted_first(verdict, trees), p_root) > 1e-3


def test_the_test_detects_a_wrong_law() -> None:
    """Sanity: the same statistic rejects samples from another distribution."""
    rng = np.random.default_rng(0)
    p = np.asarray(jax.nn.softmax(jnp.asarray(_law(1)[0])))
    wrong = np.asarray(jax.nn.softmax(jnp.asarray(_law(2)[0])))
    assert _chi2_pvalue(rng.choice(V, size=N, p=wrong), p) < 1e-6


def test_typical_acceptance_accepts_plausible_tokens_only() -> None:
    logits = np.full((1, 2, V), -10.0, np.float32)
    logits[0, 0, 1] = 0.0
    logits[0, 0, 2] = -0.5  # plausible second choice
    tree = _tree([[2, 5]], [[-1, -1]])
    typical = TypicalAcceptance(epsilon=0.2, delta=0.3)
    verdict = _accept(Sample(temperature=1.0), logits, tree, typical=typical)
    assert int(verdict.num_accepted[0]) == 1 and verdict.path[0, 0] == 0  # token 2 accepted, not 5
    with pytest.raises(ValueError, match="epsilon"):
        TypicalAcceptance(epsilon=0.0)
    with pytest.raises(ValueError, match="delta"):
        TypicalAcceptance(delta=-1.0)


def test_greedy_prefers_the_deeper_of_duplicate_siblings() -> None:
    # root -> {0: tok 1, 1: tok 1}; node 1 -> {2: tok 3}: the path through node 1 is longer.
    tree = _tree([[1, 1, 3]], [[-1, -1, 1]])
    logits = _one_hot_logits([1, 3, 3, 4])
    verdict = _accept(Greedy(), logits, tree)
    assert int(verdict.num_accepted[0]) == 2 and verdict.path[0, :2].tolist() == [1, 2]
    assert int(verdict.next_token[0]) == 4
