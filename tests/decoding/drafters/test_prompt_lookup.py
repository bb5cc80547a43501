"""Prompt lookup / CopySpec drafter: n-gram matching on hand-built histories, greedy
equivalence with plain decoding, and argument errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.speculative import RAGGED_PROMPTS, SINGLE_PROMPT, assert_matches_greedy
from helpers.tiny import tiny_model

from efficient.decoding import generate
from efficient.decoding.drafters.base import DraftContext
from efficient.decoding.drafters.prompt_lookup import PromptLookupDrafter, lookup
from efficient.decoding.tree import check_tree

PAD = 0
# A repetitive prompt (16 tokens, the same shape bucket as SINGLE_PROMPT) whose greedy
# continuation settles into a cycle that the lookup copies.
REPETITIVE_PROMPT = [[5, 6, 7, 8] * 4]
# Greedy output [24, 27, 51, 35, 9, 27, 12, 38, 58, ...]: after 38 the lookup copies 58, 59, ...
# from the prompt and the target accepts 58, which occurs there for the first time.
# (Found by search over random 7-token cycles; the test asserts the property, not the ids.)
STOP_PROMPT = [([31, 23, 38, 58, 59, 14, 33] * 3)[:16]]


def _lookup(rows: list[list[int]], last: list[int], *, length: int = 4, max_ngram: int = 3,
            min_ngram: int = 1, capacity: int = 16) -> tuple[list[list[int]], list[int]]:
    """lookup() on right-padded rows; returns the proposed continuations and matched n."""
    history = np.full((len(rows), capacity), PAD, np.int32)
    for b, row in enumerate(rows):
        history[b, : len(row)] = row
    tokens, counts, ngram = lookup(jnp.asarray(history), jnp.asarray(last, jnp.int32), length=length,
                                   max_ngram=max_ngram, min_ngram=min_ngram)
    tokens, counts = np.asarray(tokens), np.asarray(counts)
    return [tokens[b, : counts[b]].tolist() for b in range(len(rows))], np.asarray(ngram).tolist()


def test_no_match_proposes_nothing() -> None:
    drafts, ngram = _lookup([[1, 2, 3, 4]], [3])
    assert drafts == [[]] and ngram == [0]


def test_longest_ngram_beats_a_shorter_more_recent_match() -> None:
    # Suffix (6, 7): the bigram occurs at 1-2 (followed by 9); 7 alone recurs later at 5 (followed by 8).
    drafts, ngram = _lookup([[5, 6, 7, 9, 1, 7, 8, 6, 7]], [8], length=2)
    assert ngram == [2] and drafts == [[9, 1]]
    # With bigrams excluded the most recent unigram wins.
    drafts, ngram = _lookup([[5, 6, 7, 9, 1, 7, 8, 6, 7]], [8], length=2, max_ngram=1)
    assert ngram == [1] and drafts == [[8, 6]]


def test_ties_take_the_most_recent_occurrence() -> None:
    drafts, ngram = _lookup([[1, 2, 11, 3, 1, 2, 22, 4, 1, 2]], [9], length=2)
    assert ngram == [2] and drafts == [[22, 4]]


def test_min_ngram_rejects_shorter_matches() -> None:
    drafts, ngram = _lookup([[3, 7, 9, 5, 7]], [4], min_ngram=2)
    assert drafts == [[]] and ngram == [0]
    drafts, _ = _lookup([[3, 7, 9, 5, 7]], [4], min_ngram=1)
    assert drafts == [[9, 5, 7]]


def test_continuation_stops_at_last_position() -> None:
    # Tokens after last_position (a stale buffer) must never be proposed.
    drafts, ngram = _lookup([[1, 2, 3, 1, 2, 50, 51, 52]], [4], length=8)
    assert ngram == [2] and drafts == [[3, 1, 2]]
    # A periodic run: the most recent match proposes one period.
    drafts, ngram = _lookup([[4, 4, 4, 4, 4]], [4], length=8)
    assert ngram == [3] and drafts == [[4]]


def test_batch_rows_are_independent() -> None:
    rows = [[1, 2, 3, 1, 2], [9, 8, 7], [6, 5, 6, 5, 4, 6, 5, 4, 6]]
    last = [4, 2, 8]
    drafts, ngram = _lookup(rows, last)
    for b, row in enumerate(rows):
        single, single_n = _lookup([row], [last[b]])
        assert drafts[b] == single[0] and ngram[b] == single_n[0]
    assert drafts == [[3, 1, 2], [], [5, 4, 6]]
    assert ngram == [2, 0, 3]


def test_propose_builds_a_chain_and_skips_inactive_rows() -> None:
    drafter = PromptLookupDrafter.create(length=4, max_ngram=2)
    history = np.zeros((3, 12), np.int32)
    history[0, :6] = [1, 2, 3, 4, 1, 2]
    history[1, :6] = [1, 2, 3, 4, 1, 2]
    history[2, :3] = [5, 6, 7]
    last = jnp.asarray([5, 5, 2], jnp.int32)
    ctx = DraftContext(history=jnp.asarray(history), last_position=last,
                       last_token=jnp.asarray(history)[jnp.arange(3), last],
                       active=jnp.asarray([True, False, True]), key=jax.random.key(0), target=None,
                       cache=None, rule=None)
    state = drafter.init(None)
    tree, state, cache = drafter.propose(state, ctx)
    check_tree(tree, vocab_size=61)
    assert tree.probs is None and cache is None and state is None
    np.testing.assert_array_equal(tree.parents, np.broadcast_to(np.arange(4) - 1, (3, 4)))
    np.testing.assert_array_equal(tree.valid, [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(tree.tokens[0], [3, 4, 1, 2])
    assert drafter.is_chain and drafter.tree_size == drafter.max_depth == 4


# ------------------------------------------------------------------ greedy equivalence
def test_greedy_single_prompt() -> None:
    assert_matches_greedy(tiny_model(0), PromptLookupDrafter.create(), SINGLE_PROMPT, max_new_tokens=16)


def test_greedy_ragged_batch() -> None:
    assert_matches_greedy(tiny_model(0), PromptLookupDrafter.create(), RAGGED_PROMPTS, max_new_tokens=16)


def test_repetitive_prompt_gets_drafts_accepted() -> None:
    out = assert_matches_greedy(tiny_model(0), PromptLookupDrafter.create(), REPETITIVE_PROMPT,
                                max_new_tokens=16)
    assert out.stats.draft_tokens_accepted > 0
    assert out.stats.mean_accepted_tokens > 1


def _accepted_draft_indices(drafter: PromptLookupDrafter, prompt: list[int], output: list[int]) -> list[int]:
    """Replay the greedy loop: indices of `output` that were emitted as accepted drafts."""
    history = np.zeros((1, len(prompt) + len(output) + 1), np.int32)
    history[0, : len(prompt) + len(output)] = prompt + output
    indices, n = [], 1  # the first token comes from the prefill
    while n < len(output):
        last = len(prompt) + n - 1
        tokens, counts, _ = lookup(jnp.asarray(np.where(np.arange(history.shape[1]) <= last, history, PAD)),
                                   jnp.asarray([last]), length=drafter.length, max_ngram=drafter.max_ngram,
                                   min_ngram=drafter.min_ngram)
        draft = np.asarray(tokens)[0, : int(counts[0])].tolist()
        accepted = 0
        while accepted < len(draft) and n + accepted < len(output) and draft[accepted] == output[n + accepted]:
            accepted += 1
        indices += list(range(n, n + accepted))
        n += accepted + 1
    return indices


def test_stop_token_inside_an_accepted_draft() -> None:
    model, drafter = tiny_model(0), PromptLookupDrafter.create()
    prompt = STOP_PROMPT[0]
    output = generate(model, [prompt], max_new_tokens=16, stop_tokens=()).sequences()[0]
    # A token first emitted as an accepted draft (not the target's bonus token) becomes the stop.
    picks = [i for i in _accepted_draft_indices(drafter, prompt, output)
             if output[i] not in output[:i] and i < len(output) - 1]
    assert picks, output
    stop = output[picks[0]]
    out = assert_matches_greedy(model, drafter, STOP_PROMPT, max_new_tokens=16, stop_tokens=(stop,))
    assert out.sequences()[0] == output[: picks[0] + 1] and bool(out.stopped[0])
    assert out.stats.draft_tokens_accepted > 0


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(length=0), "length"),
    (dict(length=257), "length"),
    (dict(length=2.0), "length"),
    (dict(max_ngram=0), "max_ngram"),
    (dict(max_ngram="3"), "max_ngram"),
    (dict(min_ngram=0), "min_ngram"),
    (dict(min_ngram=True), "min_ngram"),
    (dict(max_ngram=2, min_ngram=3), "min_ngram"),
])
def test_create_rejects_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        PromptLookupDrafter.create(**kwargs)
