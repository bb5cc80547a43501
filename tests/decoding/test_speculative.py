"""The speculative loop: greedy equivalence with oracle and model drafters, tree commits,
stops inside accepted drafts, tracing, statistics, the sampled law, bad input."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.speculative import (
    exact_pair_law,
    RAGGED_PROMPTS,
    SINGLE_PROMPT,
    OracleDrafter,
    assert_matches_greedy,
    greedy_future,
)
from helpers.tiny import tiny_model
from scipy import stats

from efficient.decoding import TRACE_COUNTS, Sample, generate
from efficient.decoding.drafters import DraftModelDrafter
from efficient.decoding.drafters.prompt_lookup import PromptLookupDrafter
from efficient.decoding.speculative import speculative_generate
from efficient.decoding.tree import MAX_TREE_NODES
from efficient.decoding.verify import TypicalAcceptance
from efficient.models import RopeConfig, forward

MAX_NEW = 24


@pytest.mark.parametrize("prompts", [SINGLE_PROMPT, RAGGED_PROMPTS], ids=["batch1", "ragged3"])
@pytest.mark.parametrize("mode", ["right_chain", "wrong_chain", "right_tree"])
def test_oracle_drafters_match_greedy(prompts, mode: str) -> None:  # noqa: ANN001
    model = tiny_model(0)
    future = greedy_future(model, prompts, MAX_NEW + 8)
    drafter = OracleDrafter(future=future, length=4, wrong=mode == "wrong_chain", tree=mode == "right_tree")
    out = assert_matches_greedy(model, drafter, prompts, max_new_tokens=MAX_NEW)
    s = out.stats
    if mode == "wrong_chain":
        assert s.draft_tokens_accepted == 0 and s.target_forwards == MAX_NEW  # prefill + 23 steps
        assert s.acceptance_by_depth[0] == 0.0
    elif mode == "right_chain":
        # Every draft accepted: 5 tokens per verification until the budget runs out.
        assert s.target_forwards == 1 + int(np.ceil((MAX_NEW - 1) / 5))
        assert s.acceptance_by_depth == (1.0, 1.0, 1.0, 1.0)
    else:
        assert s.mean_accepted_tokens == pytest.approx(4.0, rel=0.2)  # depth 3 + the next token


def test_stop_token_inside_an_accepted_draft() -> None:
    model = tiny_model(0)
    reference = generate(model, RAGGED_PROMPTS, max_new_tokens=MAX_NEW, stop_tokens=())
    # A token that appears mid-way in some row's greedy output.
    stop = reference.sequences()[0][5]
    future = greedy_future(model, RAGGED_PROMPTS, MAX_NEW + 8)
    out = assert_matches_greedy(model, OracleDrafter(future=future, length=6), RAGGED_PROMPTS,
                                max_new_tokens=MAX_NEW, stop_tokens=[stop])
    assert out.stopped[0] and out.lengths[0] <= 6


@pytest.mark.parametrize("prompts", [SINGLE_PROMPT, RAGGED_PROMPTS], ids=["batch1", "ragged3"])
def test_draft_model_drafter_matches_greedy(prompts) -> None:  # noqa: ANN001
    target, draft = tiny_model(0), tiny_model(1)
    assert_matches_greedy(target, DraftModelDrafter.create(draft, target.config, length=3), prompts)
    # The target as its own draft: every token accepted (the same length: the draft's weights
    # are loop arguments, so this reuses the compiled loop).
    out = assert_matches_greedy(target, DraftModelDrafter.create(target, target.config, length=3), prompts)
    assert out.stats.acceptance_by_depth == (1.0, 1.0, 1.0)


def test_adaptive_draft_length_stops_early_and_matches_greedy() -> None:
    target, draft = tiny_model(0), tiny_model(1)
    strict = DraftModelDrafter.create(draft, target.config, length=6, stop_threshold=0.05)
    out = assert_matches_greedy(target, strict, RAGGED_PROMPTS)
    # A random draft is never 95% sure of a whole chain: a single token per step.
    assert out.stats.proposed_by_depth[1] == 0
    lax = DraftModelDrafter.create(target, target.config, length=6, stop_threshold=0.99)
    out = assert_matches_greedy(target, lax, RAGGED_PROMPTS)
    assert out.stats.proposed_by_depth[0] >= out.stats.proposed_by_depth[-1]


def test_decode_loop_traces_once_per_bucket() -> None:
    model = tiny_model(0)
    drafter = DraftModelDrafter.create(tiny_model(1), model.config, length=3)
    speculative_generate(model, [[1, 2, 3]], drafter=drafter, max_new_tokens=12, stop_tokens=())
    before = TRACE_COUNTS["speculative"]
    speculative_generate(model, [[4, 5, 6, 7, 8]], drafter=drafter, max_new_tokens=12, stop_tokens=())
    speculative_generate(model, [[9, 10]], drafter=drafter, max_new_tokens=9, stop_tokens=())
    assert TRACE_COUNTS["speculative"] == before


def test_cache_after_speculation_equals_plain_prefill() -> None:
    """The committed cache (through tree select) holds exactly the prompt + output entries:
    continuing from it gives the logits of a fresh cacheless forward."""
    model = tiny_model(0)
    prompts = [SINGLE_PROMPT[0]]
    future = greedy_future(model, prompts, 16)
    from efficient.cache import DenseKVCache
    from efficient.decoding import speculative as spec

    captured = {}
    original = spec._speculative_loop

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = original(*args, **kwargs)
        captured["cache"] = result[-1]
        return result

    spec._speculative_loop = spy
    try:
        out = spec.speculative_generate(model, prompts, drafter=OracleDrafter(future=future, tree=True),
                                        max_new_tokens=16, stop_tokens=())
    finally:
        spec._speculative_loop = original
    cache: DenseKVCache = captured["cache"]
    sequence = prompts[0] + out.sequences()[0]
    n = len(sequence) - 1  # the last token is not in the cache yet
    # The last step may commit accepted tokens past the token budget: cut there.
    assert int(cache.lengths[0]) >= n
    cache = cache.truncate(jnp.asarray([n]))
    assert np.asarray(cache.positions[0, :n]).tolist() == list(range(n))
    logits, _ = forward(model, jnp.asarray([sequence[-1:]]), cache=cache)
    full, _ = forward(model, jnp.asarray([sequence]))
    np.testing.assert_allclose(np.asarray(logits[0, -1]), np.asarray(full[0, -1]), atol=1e-4)


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_sampled_output_follows_the_target_law(tree: bool) -> None:
    """Rows of one batch are independent samples: the (x1, x2) pairs and the x3 marginal of
    speculative sampling follow the target's law (chi-square, fixed seeds)."""
    v = 7
    target = tiny_model(0, vocab_size=v)
    draft = tiny_model(3, vocab_size=v)
    rule = Sample(temperature=1.0, top_k=5)
    prompt = [1, 2, 3]
    n = 2000
    if tree:
        future = jnp.zeros((n, 64), jnp.int32)  # a fixed point-mass tree, right or wrong at random
        drafter = OracleDrafter(future=future, tree=True, vocab_size=v)
    else:
        drafter = DraftModelDrafter.create(draft, target.config, length=3)
    out = speculative_generate(target, [prompt] * n, drafter=drafter, max_new_tokens=3, sampling=rule, key=4,
                               stop_tokens=())
    seqs = np.asarray(out.tokens)
    law = np.asarray(exact_pair_law(target, prompt, rule), np.float64)  # scipy checks sums to 1.5e-8
    pairs = seqs[:, 0] * v + seqs[:, 1]
    keep = law.ravel() > 0
    counts = np.bincount(pairs, minlength=v * v)
    assert counts[~keep].sum() == 0
    expected = law.ravel()[keep] / law.ravel()[keep].sum() * n
    assert stats.chisquare(counts[keep], expected).pvalue > 1e-3
    assert out.stats.draft_tokens_accepted > 0


def test_typical_acceptance_runs_and_reports_itself_lossy() -> None:
    model = tiny_model(0)
    drafter = DraftModelDrafter.create(model, model.config, length=3)
    out = speculative_generate(model, RAGGED_PROMPTS, drafter=drafter, max_new_tokens=10,
                               sampling=Sample(temperature=1.0), typical=TypicalAcceptance(), key=0, stop_tokens=())
    assert all(len(row) == 10 for row in out.sequences())


def test_bad_input() -> None:
    target = tiny_model(0)
    other_vocab = tiny_model(1, vocab_size=40)
    with pytest.raises(ValueError, match="vocab_size"):
        DraftModelDrafter.create(other_vocab, target.config)
    with pytest.raises(ValueError, match="length"):
        DraftModelDrafter.create(target, target.config, length=-1)
    with pytest.raises(ValueError, match="length"):
        DraftModelDrafter.create(target, target.config, length=MAX_TREE_NODES + 1)
    with pytest.raises(ValueError, match="stop_threshold"):
        DraftModelDrafter.create(target, target.config, stop_threshold=1.5)
    with pytest.raises(TypeError, match="drafter"):
        speculative_generate(target, SINGLE_PROMPT, drafter=object(), max_new_tokens=4)
    too_big = OracleDrafter(future=jnp.zeros((1, 8), jnp.int32), length=MAX_TREE_NODES + 1)
    with pytest.raises(ValueError, match="tree_size"):
        speculative_generate(target, SINGLE_PROMPT, drafter=too_big, max_new_tokens=4)
    drafter = DraftModelDrafter.create(target, target.config, length=4)
    with pytest.raises(ValueError, match="capacity"):
        speculative_generate(target, SINGLE_PROMPT, drafter=drafter, max_new_tokens=30, capacity=32)
    with pytest.raises(TypeError, match="typical"):
        speculative_generate(target, SINGLE_PROMPT, drafter=drafter, max_new_tokens=4, typical=0.5)
    with pytest.raises(TypeError, match="draft"):
        DraftModelDrafter.create("not a model", target.config)  # type: ignore[arg-type]
    dynamic = tiny_model(0, rope=RopeConfig(rope_type="dynamic", factor=2.0), max_position_embeddings=20)
    with pytest.raises(ValueError, match="dynamic"):
        speculative_generate(dynamic, SINGLE_PROMPT, drafter=DraftModelDrafter.create(dynamic, dynamic.config),
                             max_new_tokens=12)


def test_prompt_lookup_greedy_equals_generate_in_float32() -> None:
    """In float32, greedy speculative decoding (tiny model, prompt-lookup drafter) gives
    exactly `generate`'s tokens, with drafts accepted (the same shapes as the drafter's tests)."""
    model = tiny_model(0)
    assert model.dtype == jnp.float32 and model.config.dtype == "float32"
    out = assert_matches_greedy(model, PromptLookupDrafter.create(), [[5, 6, 7, 8] * 4], max_new_tokens=16)
    assert out.stats.draft_tokens_accepted > 0
