"""The jitted generate loop: greedy equivalence, ragged batches, stops, tracing, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tiny import TINY, tiny_model

from efficient.cache import DenseKVCache
from efficient.decoding import TRACE_COUNTS, Greedy, Sample, generate
from efficient.decoding.generate import _decode_loop, _prefill
from efficient.models import jit_forward

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [40, 41, 42, 43, 44]]


def _stepwise_greedy(model, prompt: list[int], steps: int) -> list[int]:  # noqa: ANN001
    """Reference: argmax of a cacheless full forward, one token at a time (the
    sequence is kept in a fixed 32-wide buffer, pads at position -1, so it compiles once)."""
    step = jit_forward(model)
    seq = list(prompt)
    for _ in range(steps):
        tokens = np.zeros((1, 32), np.int32)
        tokens[0, : len(seq)] = seq
        index = np.arange(32)
        positions = np.where(index < len(seq), index, -1)[None]
        logits, _ = step(jnp.asarray(tokens), jnp.asarray(positions), None, None,
                         jnp.asarray([[len(seq) - 1]]))
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt):]


def test_greedy_equals_stepwise_argmax_on_a_ragged_batch() -> None:
    model = tiny_model()
    out = generate(model, PROMPTS, max_new_tokens=10)
    assert out.tokens.shape == (3, 10)
    for prompt, seq in zip(PROMPTS, out.sequences(), strict=True):
        assert seq == _stepwise_greedy(model, prompt, 10)
    assert len({tuple(s) for s in out.sequences()}) == 3  # rows really differ
    assert out.stats.target_forwards == 10  # one prefill + nine decode steps
    assert out.stats.prompt_tokens == sum(map(len, PROMPTS))


def test_padding_and_batching_do_not_change_outputs() -> None:
    model = tiny_model()
    together = generate(model, PROMPTS, max_new_tokens=8).sequences()
    alone = [generate(model, [p], max_new_tokens=8).sequences()[0] for p in PROMPTS]
    assert together == alone


def test_prompt_array_with_lengths_equals_list_input() -> None:
    model = tiny_model()
    array = np.zeros((3, 7), np.int32)
    for i, p in enumerate(PROMPTS):
        array[i, : len(p)] = p
    from_array = generate(model, array, prompt_lengths=[3, 7, 5], max_new_tokens=6).sequences()
    assert from_array == generate(model, PROMPTS, max_new_tokens=6).sequences()


def test_stop_token_ends_a_row_and_the_row_stops_changing() -> None:
    model = tiny_model()
    free = generate(model, PROMPTS, max_new_tokens=12)
    row = free.sequences()[1]
    stop = row[3]
    first = row.index(stop)
    out = generate(model, PROMPTS, max_new_tokens=12, stop_tokens=[stop])
    assert out.sequences()[1] == row[: first + 1]
    assert out.stopped[1]
    assert np.all(out.tokens[1, first + 1 :] == TINY.pad_token_id)
    for i in (0, 2):  # other rows continue until their own stop or the limit
        seq = free.sequences()[i]
        expect = seq[: seq.index(stop) + 1] if stop in seq else seq
        assert out.sequences()[i] == expect


def test_stop_tokens_default_to_the_model_eos_ids() -> None:
    free = generate(tiny_model(), PROMPTS, max_new_tokens=12).sequences()
    eos = free[1][3]
    model = tiny_model(eos_token_ids=(eos,))
    assert generate(model, PROMPTS, max_new_tokens=12).sequences()[1] == free[1][: free[1].index(eos) + 1]
    assert generate(model, PROMPTS, max_new_tokens=12, stop_tokens=()).sequences() == free


def test_a_cache_of_exactly_prompt_plus_new_tokens_is_enough() -> None:
    # A 20-token prompt pads to the 32 bucket; 20 + 5 slots hold it (padding takes no slot),
    # also through speculative decoding's prefill, and the output does not change.
    from efficient.decoding.drafters import PromptLookupDrafter
    from efficient.decoding.speculative import speculative_generate

    prompts = [list(range(1, 21)), [7, 8, 9]]
    reference = generate(tiny_model(), prompts, max_new_tokens=5).sequences()
    assert generate(tiny_model(), prompts, max_new_tokens=5, capacity=25).sequences() == reference
    drafter = PromptLookupDrafter.create(length=2)
    spec = speculative_generate(tiny_model(), prompts, drafter=drafter, max_new_tokens=5, capacity=28)
    assert spec.sequences() == reference
    with pytest.raises(ValueError, match="beyond capacity 24"):
        generate(tiny_model(), prompts, max_new_tokens=5, capacity=24)


def test_per_row_max_new_tokens() -> None:
    model = tiny_model()
    out = generate(model, PROMPTS, max_new_tokens=[2, 9, 5])
    full = generate(model, PROMPTS, max_new_tokens=9).sequences()
    assert out.lengths.tolist() == [2, 9, 5]
    assert [s for s in out.sequences()] == [full[0][:2], full[1], full[2][:5]]
    assert not out.stopped.any()


def test_sampling_is_deterministic_per_key_and_varies_across_keys() -> None:
    model = tiny_model()
    rule = Sample(temperature=1.0, top_k=20)
    a = generate(model, PROMPTS, max_new_tokens=16, sampling=rule, key=jax.random.key(1))
    b = generate(model, PROMPTS, max_new_tokens=16, sampling=rule, key=jax.random.key(1))
    c = generate(model, PROMPTS, max_new_tokens=16, sampling=rule, key=jax.random.key(2))
    assert a.sequences() == b.sequences()
    assert a.sequences() != c.sequences()


def test_one_trace_per_bucket_across_64_steps_and_two_prompt_lengths() -> None:
    model = tiny_model()
    for fn in (_prefill, _decode_loop):
        fn.clear_cache()
    before = dict(TRACE_COUNTS)
    first = generate(model, [[3, 4, 5, 6, 7]], max_new_tokens=64)
    second = generate(model, [[9, 8, 7, 6, 5, 4, 3, 2, 11, 12, 13]], max_new_tokens=64)
    assert first.lengths.tolist() == [64] and second.lengths.tolist() == [64]
    assert first.stats.target_forwards == 64
    assert TRACE_COUNTS["prefill"] - before.get("prefill", 0) == 1
    assert TRACE_COUNTS["decode"] - before.get("decode", 0) == 1


def test_custom_cache_factory_and_capacity() -> None:
    model = tiny_model()
    made = []

    def factory(config, batch, capacity):  # noqa: ANN001, ANN202
        made.append(capacity)
        return DenseKVCache.for_model(config, batch, capacity)

    out = generate(model, PROMPTS, max_new_tokens=5, cache=factory, capacity=40)
    assert made == [40]
    assert out.sequences() == generate(model, PROMPTS, max_new_tokens=5).sequences()


def test_default_capacity_is_a_quarter_octave_bucket() -> None:
    """At most 25% more slots than prompt + max_new_tokens (a power of two wasted up to 2x)."""
    from efficient.decoding.prompts import capacity_bucket

    assert [capacity_bucket(n) for n in (1, 64, 65, 81, 129, 300, 4224, 8192, 8193)] == [
        64, 64, 80, 96, 160, 320, 5120, 8192, 10240]
    assert all(n <= capacity_bucket(n) <= max(64, 1.25 * n) for n in range(1, 5000, 7))
    with pytest.raises(ValueError, match="minimum"):
        capacity_bucket(10, 0)
    made = []

    def factory(config, batch, capacity):  # noqa: ANN001, ANN202
        made.append(capacity)
        return DenseKVCache.for_model(config, batch, capacity)

    generate(tiny_model(), [[3, 4, 5]], max_new_tokens=70, cache=factory)
    assert made == [80]


def test_greedy_rule_object_is_default() -> None:
    model = tiny_model()
    assert (generate(model, PROMPTS, max_new_tokens=4, sampling=Greedy()).sequences()
            == generate(model, PROMPTS, max_new_tokens=4, sampling=Sample(temperature=0.0)).sequences())


@pytest.mark.parametrize(
    ("prompts", "kwargs", "error", "match"),
    [
        ([[]], {}, ValueError, "prompt 0 is empty"),
        ([], {}, ValueError, "prompts is empty"),
        ([[1, 2, 61]], {}, ValueError, "token id 61 outside the vocabulary"),
        ([[1, -1]], {}, ValueError, "token id -1"),
        (np.zeros((2, 3), np.float32), {}, TypeError, "integer"),
        (np.zeros((2, 3, 1), np.int32), {}, ValueError, "rank 2"),
        ([[1, 2]], {"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ([[1, 2]], {"max_new_tokens": 2.5}, ValueError, "max_new_tokens"),
        ([[1, 2]], {"capacity": 8, "max_new_tokens": 20}, ValueError, "beyond capacity 8"),
        ([[1, 2]], {"stop_tokens": [99]}, ValueError, "stop token 99"),
        ([[1, 2]], {"key": "seed"}, TypeError, "key"),
        ([[1, 2]], {"stop_tokens": 5}, TypeError, "stop_tokens"),
        ([[1, 2]], {"max_new_tokens": [3, 4]}, ValueError, "one per prompt"),
        ("hello", {}, TypeError, "prompts"),
    ],
)
def test_bad_input_raises_typed_errors(prompts, kwargs, error, match) -> None:  # noqa: ANN001
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=match):
        generate(tiny_model(), prompts, **kwargs)
