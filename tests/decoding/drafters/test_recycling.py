"""Token Recycling drafter: template, tree expansion and matrix updates on hand-built
inputs, greedy equivalence with plain decoding, and argument errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.speculative import (
    RAGGED_PROMPTS,
    STEPS,
    RecordingDrafter,
    accepted_draft_indices,
    assert_matches_greedy,
)
from helpers.tiny import TINY, tiny_model

from efficient.decoding.drafters.base import DraftContext, PromptContext, VerifyOutcome
from efficient.decoding.drafters.recycling import (
    DEFAULT_BRANCHING,
    TokenRecyclingDrafter,
    expand,
    prompt_successors,
    recycle,
    template,
)
from efficient.decoding.tree import DraftTree, check_tree, template_parents

SMALL = ((3,), (2, 1, 0), (1, 0, 1))  # 8 nodes, depth 3


def _context(history: np.ndarray, last: list[int], active: list[bool]) -> DraftContext:
    history, last_position = jnp.asarray(history, jnp.int32), jnp.asarray(last, jnp.int32)
    return DraftContext(history=history, last_position=last_position,
                        last_token=history[jnp.arange(history.shape[0]), last_position],
                        active=jnp.asarray(active), key=jax.random.key(0), target=None, cache=None, rule=None)


# ------------------------------------------------------------------ drafting logic
def test_template_records_each_nodes_rank() -> None:
    parents, ranks, depths = template(SMALL)
    np.testing.assert_array_equal(parents, [-1, -1, -1, 0, 0, 1, 3, 5])
    np.testing.assert_array_equal(ranks, [0, 1, 2, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(depths, [1, 1, 1, 2, 2, 2, 3, 3])


def test_default_template_is_a_small_deep_tree() -> None:
    drafter = TokenRecyclingDrafter.create()
    assert 20 <= drafter.tree_size <= 30 and 4 <= drafter.max_depth <= 5
    assert not drafter.is_chain and drafter.top_k == max(max(level) for level in DEFAULT_BRANCHING)
    # Deeper levels have fewer children per node.
    widths = [max(level) for level in DEFAULT_BRANCHING]
    assert widths == sorted(widths, reverse=True)


def test_expand_follows_the_template() -> None:
    matrix = np.random.default_rng(0).integers(0, 10, (10, 3)).astype(np.int32)
    root = np.asarray([4, 7], np.int32)
    tokens = np.asarray(expand(jnp.asarray(matrix), jnp.asarray(root), SMALL))
    parents, ranks, _ = template(SMALL)
    for b in range(2):
        for i in range(len(parents)):
            parent_token = root[b] if parents[i] < 0 else tokens[b, parents[i]]
            assert tokens[b, i] == matrix[parent_token, ranks[i]]


def test_propose_fills_the_template_for_active_rows() -> None:
    drafter = TokenRecyclingDrafter.create(branching=SMALL)
    matrix = jnp.asarray(np.random.default_rng(1).integers(0, 10, (10, 3)), jnp.int32)
    history = np.zeros((2, 8), np.int32)
    history[0, :3] = [1, 2, 3]
    history[1, :2] = [5, 6]
    ctx = _context(history, [2, 1], [True, False])
    tree, state, cache = drafter.propose(matrix, ctx)
    check_tree(tree, vocab_size=10)
    assert tree.probs is None and cache is None and state is matrix
    np.testing.assert_array_equal(tree.parents, np.broadcast_to(template_parents(SMALL), (2, 8)))
    np.testing.assert_array_equal(tree.valid, [[True] * 8, [False] * 8])
    np.testing.assert_array_equal(tree.tokens, expand(matrix, jnp.asarray([3, 6]), SMALL))


def test_recycle_writes_the_top_k_of_each_verified_position() -> None:
    v, k = 8, 2
    matrix = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32)[:, None], (v, k))
    logits = np.zeros((1, 3, v), np.float32)
    logits[0, 0, [6, 1]] = [3.0, 2.0]  # root (token 3): top-2 = 6, 1
    logits[0, 1, [2, 7]] = [1.0, 5.0]  # node 0 (token 5): top-2 = 7, 2
    logits[0, 2, [0, 4]] = [9.0, 8.0]  # node 1 (token 6): does not exist, not written
    tokens = jnp.asarray([[3, 5, 6]])
    valid = jnp.asarray([[True, True, False]])
    new = np.asarray(recycle(matrix, tokens, jnp.asarray(logits), valid))
    expected = np.asarray(matrix).copy()
    expected[3], expected[5] = [6, 1], [7, 2]
    np.testing.assert_array_equal(new, expected)


def test_recycle_collisions_prefer_priority_then_the_later_position() -> None:
    v, k = 6, 1
    matrix = jnp.zeros((v, k), jnp.int32)
    logits = jnp.asarray(np.eye(v, dtype=np.float32)[[1, 2, 3, 4]][None])  # position t predicts t + 1
    tokens = jnp.asarray([[0, 0, 0, 5]])
    valid = jnp.ones((1, 4), bool)
    assert np.asarray(recycle(matrix, tokens, logits, valid))[0, 0] == 3  # the later position
    priority = jnp.asarray([[1, 0, 1, 0]])
    assert np.asarray(recycle(matrix, tokens, logits, valid, priority))[0, 0] == 3
    priority = jnp.asarray([[0, 1, 0, 0]])
    assert np.asarray(recycle(matrix, tokens, logits, valid, priority))[0, 0] == 2


def test_update_recycles_root_and_nodes_across_the_batch() -> None:
    drafter = TokenRecyclingDrafter.create(branching=((2,),), top_k=2)
    v = 8
    matrix = jnp.zeros((v, 2), jnp.int32)
    ctx = _context(np.asarray([[1, 2], [3, 4]]), [1, 1], [True, True])  # roots: 2 and 4
    tree = DraftTree(tokens=jnp.asarray([[5, 6], [5, 7]]), parents=jnp.asarray([[-1, -1], [-1, -1]]),
                     valid=jnp.asarray([[True, False], [True, True]]))
    logits = jax.random.normal(jax.random.key(0), (2, 3, v))
    # Row 0 accepts node 0 (token 5); row 1 rejects its node 0 (also token 5) and accepts node 1.
    outcome = VerifyOutcome(tree=tree, valid=tree.valid, logits=logits, hidden=None, path=jnp.asarray([[0, -1], [1, -1]]),
                            num_accepted=jnp.asarray([1, 1]), new_tokens=jnp.zeros((2, 3), jnp.int32),
                            num_new=jnp.asarray([2, 2]), history=ctx.history, last_position=jnp.asarray([3, 3]))
    new = np.asarray(drafter.update(matrix, ctx, outcome))
    top = np.argsort(-np.asarray(logits), axis=-1)[..., :2]
    np.testing.assert_array_equal(new[2], top[0, 0])  # row 0 root
    np.testing.assert_array_equal(new[4], top[1, 0])  # row 1 root
    np.testing.assert_array_equal(new[5], top[0, 1])  # the accepted node wins over the later rejected one
    np.testing.assert_array_equal(new[7], top[1, 2])
    np.testing.assert_array_equal(new[6], [0, 0])  # row 0, node 1 does not exist
    np.testing.assert_array_equal(new[[0, 1, 3]], 0)


def test_prompt_successors_most_recent_distinct_first() -> None:
    matrix = jnp.full((10, 3), 9, jnp.int32)
    # Row 0: 1 -> 2 (at 0), 1 -> 3 (at 2), 1 -> 2 (at 4); position 6 lies past `last`.
    history = jnp.asarray([[1, 2, 1, 3, 1, 2, 4, 1], [5, 6, 0, 0, 0, 0, 0, 0]])
    new = np.asarray(prompt_successors(matrix, history, jnp.asarray([5, 1])))
    np.testing.assert_array_equal(new[1], [2, 3, 9])
    np.testing.assert_array_equal(new[2], [1, 9, 9])
    np.testing.assert_array_equal(new[3], [1, 9, 9])
    np.testing.assert_array_equal(new[5], [6, 9, 9])
    for token in (0, 4, 6, 7, 8, 9):
        np.testing.assert_array_equal(new[token], [9, 9, 9])


def test_init_seeds_the_matrix_from_the_prompts() -> None:
    model = tiny_model(0)
    tokens = jnp.asarray([[1, 2, 1, 0], [7, 8, 9, 0]])
    lengths = jnp.asarray([3, 3])
    history = jnp.zeros((2, 16), jnp.int32).at[:, :4].set(tokens).at[jnp.arange(2), lengths].set(jnp.asarray([3, 4]))
    prompt = PromptContext(tokens=tokens, lengths=lengths, history=history, first_token=jnp.asarray([3, 4]),
                           target=model, rule=None)
    matrix = np.asarray(TokenRecyclingDrafter.create(branching=SMALL).init(prompt))
    assert matrix.shape == (TINY.vocab_size, 3) and matrix.dtype == np.int32
    np.testing.assert_array_equal(matrix[1], [3, 2, 1])  # successors 3 (first token), 2; then fallback
    np.testing.assert_array_equal(matrix[9], [4, 9, 9])
    np.testing.assert_array_equal(matrix[30], [30, 30, 30])  # unseen: the token itself
    given = np.full((TINY.vocab_size, 3), 5, np.int32)
    seeded = np.asarray(TokenRecyclingDrafter.create(branching=SMALL, matrix=given).init(prompt))
    np.testing.assert_array_equal(seeded[8], [9, 5, 5])
    np.testing.assert_array_equal(seeded[30], [5, 5, 5])
    kept = np.asarray(TokenRecyclingDrafter.create(branching=SMALL, matrix=given, prompt_init=False).init(prompt))
    np.testing.assert_array_equal(kept, given)


# ------------------------------------------------------------------ greedy equivalence
# A prompt whose greedy output has a first occurrence (index 7) emitted as an accepted draft
# token (found by search over random 7-token prompts; the test asserts the property, not ids).
STOP_PROMPT = [[9, 37, 55, 52, 49, 5, 17]]


def test_greedy_single_prompt_and_stop_tokens_inside_accepted_drafts() -> None:
    model, drafter = tiny_model(0), RecordingDrafter(TokenRecyclingDrafter.create())
    STEPS.clear()
    out = assert_matches_greedy(model, drafter, STOP_PROMPT, max_new_tokens=16)
    assert out.stats.mean_accepted_tokens > 1
    output = out.sequences()[0]
    # Each distinct output token as the stop: the row ends at its first occurrence, also when
    # that occurrence is an accepted draft token followed by more accepted tokens.
    inside = 0
    for i, stop in enumerate(output[:-1]):
        if stop in output[:i]:
            continue
        STEPS.clear()
        stopped = assert_matches_greedy(model, drafter, STOP_PROMPT, max_new_tokens=16, stop_tokens=(stop,))
        assert stopped.sequences()[0] == output[: i + 1] and bool(stopped.stopped[0])
        inside += i in accepted_draft_indices([len(STOP_PROMPT[0])])[0]
    assert inside > 0


def test_greedy_ragged_batch() -> None:
    out = assert_matches_greedy(tiny_model(0), TokenRecyclingDrafter.create(), RAGGED_PROMPTS, max_new_tokens=16)
    assert out.stats.mean_accepted_tokens > 1


def test_greedy_with_a_given_matrix_and_template() -> None:
    matrix = np.random.default_rng(2).integers(0, TINY.vocab_size, (TINY.vocab_size, 3))
    drafter = TokenRecyclingDrafter.create(branching=SMALL, matrix=matrix)
    assert_matches_greedy(tiny_model(0), drafter, RAGGED_PROMPTS, max_new_tokens=16)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("kwargs", "error", "name"), [
    (dict(branching=((2,), (1,))), ValueError, "branching"),
    (dict(branching=((2,), (1, -1))), ValueError, "branching"),
    (dict(branching=((0,),)), ValueError, "branching"),
    (dict(branching=((300,),)), ValueError, "branching"),
    (dict(branching=((2.0,),)), ValueError, "branching"),
    (dict(branching=3), TypeError, "branching"),
    (dict(top_k=3), ValueError, "top_k"),
    (dict(top_k=0, branching=((1,),)), ValueError, "top_k"),
    (dict(top_k="4"), ValueError, "top_k"),
    (dict(matrix=np.zeros((61,), np.int32)), ValueError, "matrix"),
    (dict(matrix=np.full((61, 4), 61)), ValueError, "matrix"),
    (dict(matrix=np.full((61, 4), -1)), ValueError, "matrix"),
    (dict(matrix=np.zeros((61, 4), np.float32)), TypeError, "matrix"),
    (dict(matrix=np.zeros((61, 5), np.int32), top_k=4), ValueError, "matrix"),
    (dict(prompt_init=1), TypeError, "prompt_init"),
])
def test_create_rejects_bad_arguments(kwargs: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        TokenRecyclingDrafter.create(**kwargs)


def test_check_rejects_a_mismatched_target() -> None:
    with pytest.raises(ValueError, match="matrix"):
        TokenRecyclingDrafter.create(matrix=np.zeros((60, 4), np.int32)).check(TINY)
    with pytest.raises(ValueError, match="top_k"):
        TokenRecyclingDrafter.create(branching=((2,),), top_k=62).check(TINY)
