"""Draft trees: ancestry, verification inputs, templates, validation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from efficient.decoding.tree import (
    MAX_TREE_NODES,
    DraftTree,
    ancestry,
    chain,
    check_tree,
    check_tree_size,
    template_parents,
    verification_inputs,
)


def _tree(parents: list[int], valid: list[bool] | None = None) -> DraftTree:
    w = len(parents)
    return DraftTree(tokens=jnp.arange(w, dtype=jnp.int32)[None] + 10, parents=jnp.asarray([parents], jnp.int32),
                     valid=jnp.asarray([valid if valid is not None else [True] * w]))


def test_ancestry_depths_and_masks() -> None:
    #      root
    #     /    \
    #    0      1
    #   / \      \
    #  2   3      4
    anc, depths, valid = ancestry(_tree([-1, -1, 0, 0, 1]))
    assert depths[0].tolist() == [1, 1, 2, 2, 2]
    assert valid[0].tolist() == [True] * 5
    expected = np.eye(5, dtype=bool)
    expected[2, 0] = expected[3, 0] = expected[4, 1] = True
    np.testing.assert_array_equal(np.asarray(anc[0]), expected)


def test_missing_parent_removes_its_subtree() -> None:
    _, _, valid = ancestry(_tree([-1, 0, 1, -1], valid=[True, False, True, True]))
    assert valid[0].tolist() == [True, False, False, True]


def test_verification_inputs_positions_and_visibility() -> None:
    tree = _tree([-1, -1, 0])
    tokens, positions, mask, _, depths, valid = verification_inputs(
        tree, jnp.asarray([7]), jnp.asarray([20]), jnp.asarray([True]))
    assert tokens[0].tolist() == [7, 10, 11, 12]
    assert positions[0].tolist() == [20, 21, 21, 22]
    expected = np.array([[1, 0, 0, 0],  # root sees itself
                         [1, 1, 0, 0],  # node 0: root + itself
                         [1, 0, 1, 0],  # node 1: root + itself (not its sibling)
                         [1, 1, 0, 1]], bool)  # node 2: root, node 0, itself
    np.testing.assert_array_equal(np.asarray(mask[0]), expected)
    _, positions, *_ = verification_inputs(tree, jnp.asarray([7]), jnp.asarray([20]), jnp.asarray([False]))
    assert positions[0].tolist() == [-1, -1, -1, -1]  # a finished row attends nothing


def test_chain_lengths() -> None:
    tree = chain(jnp.asarray([[1, 2, 3], [4, 5, 6]]), jnp.asarray([3, 1]))
    assert tree.parents[0].tolist() == [-1, 0, 1]
    assert tree.valid.tolist() == [[True, True, True], [True, False, False]]


def test_template_parents() -> None:
    assert template_parents(((3,), (2, 1, 0), (1, 0, 1))).tolist() == [-1, -1, -1, 0, 0, 1, 3, 5]
    with pytest.raises(ValueError, match="branching"):
        template_parents(((2,), (1,)))


def test_check_tree_and_size_errors() -> None:
    check_tree(_tree([-1, 0, 1]), vocab_size=20)
    with pytest.raises(ValueError, match="parent"):
        check_tree(_tree([-1, 2, 1]))
    with pytest.raises(ValueError, match="ids"):
        check_tree(_tree([-1, 0, 1]), vocab_size=11)
    with pytest.raises(ValueError, match="tree_size"):
        check_tree_size(0)
    with pytest.raises(ValueError, match="tree_size"):
        check_tree_size(MAX_TREE_NODES + 1)
    with pytest.raises(ValueError, match="tree_size"):
        check_tree_size(True)
