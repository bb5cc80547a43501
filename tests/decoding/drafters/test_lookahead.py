"""Lookahead decoding drafter: pool insertion, diagonal n-grams, window shift, the
candidate trie, greedy equivalence (single, ragged, stops), acceptance, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.speculative import (
    RAGGED_PROMPTS,
    SINGLE_PROMPT,
    STEPS,
    RecordingDrafter,
    accepted_draft_indices,
    assert_matches_greedy,
)
from helpers.tiny import tiny_model

from efficient.decoding.drafters.base import DraftContext, Drafter, VerifyOutcome
from efficient.decoding.drafters.lookahead import (
    LookaheadDrafter,
    LookaheadState,
    candidate_tree,
    diagonal_ngrams,
    pool_insert,
    shift_window,
)
from efficient.decoding.sampling import Greedy
from efficient.decoding.tree import DraftTree, ancestry, check_tree
from efficient.decoding.verify import accept_tree


def _i32(x) -> jax.Array:  # noqa: ANN001
    return jnp.asarray(x, jnp.int32)


# ------------------------------------------------------------------ unit tests
def test_pool_insert_is_fifo_per_first_token_and_skips_duplicates() -> None:
    v, g, e = 5, 2, 2
    pool, pointer = jnp.full((2, v, g, e), -1, jnp.int32), jnp.zeros((2, v), jnp.int32)
    ngrams = _i32([[[1, 2, 3], [1, 4, 4], [1, 2, 3], [3, 0, 0], [1, 0, 0], [2, 1, 1]],
                   [[4, 4, 4], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]])
    valid = jnp.asarray([[True, True, True, False, True, True], [True] + [False] * 5])
    pool, pointer = jax.jit(pool_insert)(pool, pointer, ngrams, valid)
    pool, pointer = np.asarray(pool), np.asarray(pointer)
    # Row 0, key 1: [2, 3], [4, 4], the duplicate [2, 3] skipped, then [0, 0] overwrites slot 0.
    np.testing.assert_array_equal(pool[0, 1], [[0, 0], [4, 4]])
    np.testing.assert_array_equal(pool[0, 2], [[1, 1], [-1, -1]])
    assert np.all(pool[0, 3] == -1)  # invalid n-gram not inserted
    np.testing.assert_array_equal(pointer[0], [0, 1, 1, 0, 0])
    # Row 1 has its own pool.
    np.testing.assert_array_equal(pool[1, 4], [[4, 4], [-1, -1]])
    assert np.all(pool[1, :4] == -1) and np.all(pool[0, 4] == -1)


def test_diagonal_ngrams_follow_the_jacobi_trajectory() -> None:
    # Three iterations (oldest first) of 4 predictions; token = 100 * (iteration + 1) + position.
    starts = _i32([[10, 11, 13]])
    traj = np.asarray([[[100 * (i + 1) + s + j for j in range(4)] for i, s in enumerate([10, 11, 13])]])
    ngrams, valid = diagonal_ngrams(_i32(traj), starts)
    # Ends 13..16 of the newest: (iter 0 at e-2, iter 1 at e-1, iter 2 at e); iter 0 stops at 13.
    np.testing.assert_array_equal(np.asarray(valid), [[True, True, True, False]])
    np.testing.assert_array_equal(np.asarray(ngrams)[0, :3],
                                  [[111, 212, 313], [112, 213, 314], [113, 214, 315]])
    # A missing iteration (-1, as after init) makes every n-gram through it invalid.
    _, valid = diagonal_ngrams(_i32(traj).at[:, 1].set(-1), starts)
    assert not np.any(np.asarray(valid))


def test_window_shifts_by_the_committed_count_and_fills_past_the_predictions() -> None:
    predictions = _i32(np.tile(np.arange(10, 16), (3, 1)))  # N + 1 = 6 predictions for last+1..last+6
    filler = _i32(np.tile(np.arange(50, 55), (3, 1)))
    window = shift_window(predictions, _i32([1, 3, 6]), filler)
    np.testing.assert_array_equal(np.asarray(window), [[11, 12, 13, 14, 15], [13, 14, 15, 53, 54],
                                                       [50, 51, 52, 53, 54]])


def test_candidate_tree_merges_shared_prefixes_into_a_trie() -> None:
    window = _i32([[5, 6, 7]])
    candidates = _i32([[[9, 1], [5, 6], [9, 2], [5, 8], [-1, -1]]])
    tree = jax.jit(candidate_tree)(window, candidates)
    check_tree(tree, vocab_size=61)
    np.testing.assert_array_equal(np.asarray(tree.tokens), [[5, 6, 7, 9, 1, 5, 6, 9, 2, 5, 8, 0, 0]])
    # Chain 0-1-2; [9, 1] new; [5, 6] repeats the chain; [9, 2] hangs its 2 below node 3;
    # [5, 8] hangs its 8 below chain node 0; the empty slot does not exist.
    np.testing.assert_array_equal(np.asarray(tree.parents)[0, [0, 1, 2, 3, 4, 8, 10]], [-1, 0, 1, -1, 3, 3, 0])
    np.testing.assert_array_equal(np.asarray(tree.valid), [[1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 1, 0, 0]])
    # The greedy verifier finds the longest candidate through the merged node: 9 then 2.
    best = np.zeros(14, np.int64)
    best[0], best[1 + 3] = 9, 2

    @jax.jit
    def verify(tree: DraftTree, best: jax.Array) -> tuple[jax.Array, jax.Array]:
        _, _, valid = ancestry(tree)
        logits = jax.nn.one_hot(best, 61)[None] * 5.0
        return valid, accept_tree(Greedy(), logits, tree, valid, jax.random.key(0)).path

    valid, path = verify(tree, _i32(best))
    np.testing.assert_array_equal(np.asarray(valid), np.asarray(tree.valid))
    np.testing.assert_array_equal(np.asarray(path)[0, :3], [3, 8, -1])


def test_update_shifts_window_records_the_iteration_and_freezes_inactive_rows() -> None:
    drafter = LookaheadDrafter.create(window=3, ngram=2, candidates=2)
    v = 61
    state = LookaheadState(window=_i32([[1, 2, 3], [4, 5, 6]]),
                           trajectory=_i32([[[7, 8, 9, 10]], [[-1, -1, -1, -1]]]),
                           starts=_i32([[4], [0]]), pool=jnp.full((2, v, 2, 1), -1, jnp.int32).at[0, 4, 0].set(11),
                           pointer=jnp.zeros((2, v), jnp.int32))
    history = _i32(np.arange(20)[None].repeat(2, 0))
    predictions = _i32([[20, 21, 22, 23], [30, 31, 32, 33]])  # target argmax at root + 3 chain nodes
    logits = jax.nn.one_hot(jnp.concatenate([predictions, jnp.zeros((2, 2), jnp.int32)], 1), v)

    @jax.jit
    def step(state: LookaheadState, logits: jax.Array) -> tuple[DraftTree, LookaheadState]:
        ctx = DraftContext(history=history, last_position=_i32([4, 7]), last_token=_i32([4, 7]),
                           active=jnp.asarray([True, False]), key=jax.random.key(0), target=None, cache=None,
                           rule=Greedy())
        tree, _, _ = drafter.propose(state, ctx)
        outcome = VerifyOutcome(tree=tree, valid=tree.valid, logits=logits, hidden=None, path=None,
                                num_accepted=_i32([1, 0]), new_tokens=None, num_new=_i32([2, 0]),
                                history=history, last_position=_i32([6, 7]))
        return tree, drafter.update(state, ctx, outcome)

    tree, new = step(state, logits)
    # The window chain, then the pool entries under the last token (4 in row 0: [11]; none in row 1).
    np.testing.assert_array_equal(np.asarray(tree.tokens), [[1, 2, 3, 11, 0], [4, 5, 6, 0, 0]])
    np.testing.assert_array_equal(np.asarray(tree.valid), [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(new.window)[0, :2], [22, 23])  # shifted by 2, then filler
    assert 0 <= int(new.window[0, 2]) <= 6  # a committed token (history[p] = p, last position 6)
    np.testing.assert_array_equal(np.asarray(new.trajectory)[0, 0], [20, 21, 22, 23])
    np.testing.assert_array_equal(np.asarray(new.starts)[0], [5])
    # Bigrams (previous iteration at p - 1, this one at p) for p = 5..8.
    for key, follower in [(7, 20), (8, 21), (9, 22), (10, 23)]:
        assert int(new.pool[0, key, 0, 0]) == follower
    for field in ("window", "trajectory", "starts", "pool", "pointer"):
        np.testing.assert_array_equal(np.asarray(getattr(new, field))[1], np.asarray(getattr(state, field))[1])


# ------------------------------------------------------- greedy equivalence
def test_protocol_and_sizes() -> None:
    drafter = LookaheadDrafter.create()
    assert isinstance(drafter, Drafter)
    assert (drafter.window, drafter.ngram, drafter.candidates) == (5, 4, 4)
    assert (drafter.tree_size, drafter.max_depth, drafter.is_chain) == (17, 5, False)
    assert LookaheadDrafter.create(window=2, ngram=6, candidates=1).max_depth == 5


def test_greedy_equivalence_single_prompt() -> None:
    out = assert_matches_greedy(tiny_model(), LookaheadDrafter.create(), SINGLE_PROMPT, max_new_tokens=24)
    assert out.stats.mean_accepted_tokens > 1


def test_greedy_equivalence_ragged_batch_with_a_stop_inside_an_accepted_draft() -> None:
    model, drafter = tiny_model(), RecordingDrafter(LookaheadDrafter.create())
    STEPS.clear()
    output = assert_matches_greedy(model, drafter, RAGGED_PROMPTS, max_new_tokens=24).sequences()
    drafted = accepted_draft_indices([len(p) for p in RAGGED_PROMPTS])
    # A token whose first occurrence in some row is an accepted draft token (not the row's last).
    picks = [(b, i) for b, row in enumerate(output) for i in sorted(drafted[b])
             if row[i] not in row[:i] and i < len(row) - 1]
    assert picks, (output, drafted)
    b, i = picks[0]
    stop = output[b][i]
    STEPS.clear()
    out = assert_matches_greedy(model, drafter, RAGGED_PROMPTS, max_new_tokens=24, stop_tokens=[stop])
    assert out.sequences()[b] == output[b][: i + 1] and bool(out.stopped[b])
    assert i in accepted_draft_indices([len(p) for p in RAGGED_PROMPTS])[b]
    # Rows that never emit the stop run to the end.
    for row, seq in zip(output, out.sequences()):
        if stop not in row:
            assert seq == row


def test_repetitive_prompt_accepts_pool_and_jacobi_drafts() -> None:
    out = assert_matches_greedy(tiny_model(), LookaheadDrafter.create(), [[1, 2, 3, 1, 2, 3, 1, 2, 3]],
                                max_new_tokens=24)
    assert out.stats.mean_accepted_tokens > 1.5
    assert out.stats.accepted_by_depth[2] > 0  # three drafted tokens accepted in one step


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("name, value", [("window", 0), ("window", 2.0), ("window", True), ("window", "5"),
                                         ("ngram", 1), ("ngram", None), ("candidates", 0),
                                         ("candidates", -3), ("window", 250), ("candidates", 100),
                                         ("ngram", 80)])
def test_bad_arguments_raise_naming_them(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        LookaheadDrafter.create(**{name: value})
