"""Retrieval scoring: answer extraction, batching through a decoder, capacity errors."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.tiny import tiny_model

from efficient.cache import DenseKVCache
from efficient.data import ByteTokenizer, passkey_example
from efficient.decoding import GenerateOutput, GenerateStats, generate
from efficient.eval import retrieval_accuracy, score_answer

TOK = ByteTokenizer()
BYTE_MODEL = dict(vocab_size=259, eos_token_ids=(258,), pad_token_id=256)
FILLER = ["x = 1\ny = x + 2\n", "def f(a):\n    return a * 3\n", "for i in range(4):\n    print(i)\n"] * 4


@pytest.mark.parametrize(("answer", "output", "want"), [
    ("48213", "48213\n", (True, 1.0)),
    ("48213", " 48213)", (True, 1.0)),
    ("48213", "48219\n", (False, 0.8)),
    ("48213", "482139", (False, 1.0)),  # extra digits: not exact
    ("48213", "4821", (False, 0.8)),
    ("48213", "abc", (False, 0.0)),
])
def test_score_answer(answer: str, output: str, want: tuple[bool, float]) -> None:
    assert score_answer(answer, output) == pytest.approx(want)


def test_score_answer_rejects_a_non_digit_answer() -> None:
    with pytest.raises(ValueError, match="answer"):
        score_answer("abc", "123")


def _examples(n: int, context: int = 96) -> list:
    return [passkey_example(TOK, context, depth, seed, documents=FILLER)
            for seed, depth in zip(range(n), np.linspace(0, 1, n))]


def _oracle(examples: list, corrupt: bool = False):  # noqa: ANN202
    """A decoder that answers from the prompt's needle line (checks the plumbing, not a model)."""
    answers = {tuple(TOK.encode(e.prompt)): e.answer for e in examples}
    calls = []

    def decode(model, prompts, *, max_new_tokens, cache, key, stop_tokens):  # noqa: ANN001, ANN202
        calls.append((len(prompts), max_new_tokens, tuple(stop_tokens)))
        rows = []
        for p in prompts:
            text = answers[tuple(p)] + "\n"
            if corrupt:
                text = "9" + text[1:]
            rows.append(TOK.encode(text)[:max_new_tokens])
        width = max(len(r) for r in rows)
        tokens = np.array([r + [256] * (width - len(r)) for r in rows])
        stats = GenerateStats(1, 0, int(sum(map(len, rows))), 0.0, 0.0)
        return GenerateOutput(tokens, np.array([len(r) for r in rows]), np.zeros(len(rows), bool), stats)

    return decode, calls


def test_a_perfect_decoder_scores_one_and_batches_are_respected() -> None:
    examples = _examples(5)
    decode, calls = _oracle(examples)
    result = retrieval_accuracy(tiny_model(**BYTE_MODEL), TOK, examples, decoder=decode, batch_size=2)
    assert result.exact_match == 1.0 and result.digit_accuracy == 1.0
    assert [c[0] for c in calls] == [2, 2, 1]
    assert calls[0][1] == 5 + 2 and calls[0][2] == (258,)  # answer length + 2; the model's eos stops
    assert [r.answer for r in result.records] == [e.answer for e in examples]


def test_a_wrong_first_digit_scores_zero_exact_and_four_fifths_digits() -> None:
    examples = _examples(3)
    decode, _ = _oracle(examples, corrupt=True)
    result = retrieval_accuracy(tiny_model(**BYTE_MODEL), TOK, examples, decoder=decode)
    assert result.exact_match == 0.0
    assert result.digit_accuracy == pytest.approx(np.mean([0.8 if e.answer[0] != "9" else 1.0 for e in examples]))


def test_default_greedy_decoder_outputs_are_what_generate_writes() -> None:
    model = tiny_model(**BYTE_MODEL)
    examples = _examples(2)
    result = retrieval_accuracy(model, TOK, examples, cache=DenseKVCache.for_model, max_new_tokens=6)
    for e, record in zip(examples, result.records, strict=True):
        out = generate(model, [TOK.encode(e.prompt)], max_new_tokens=6, stop_tokens=(258,))
        assert record.output == TOK.decode(out.sequences()[0])
        assert (record.exact, record.digits) == score_answer(e.answer, record.output)


def test_a_context_beyond_the_model_capacity_raises() -> None:
    model = tiny_model(max_position_embeddings=100, **BYTE_MODEL)
    with pytest.raises(ValueError, match="max_position_embeddings 100"):
        retrieval_accuracy(model, TOK, _examples(1, context=96))  # 96 + 7 new tokens > 100
    with pytest.raises(ValueError, match="examples: empty"):
        retrieval_accuracy(model, TOK, [])
