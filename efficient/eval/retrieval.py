"""Retrieval accuracy on the synthetic needle tasks (`efficient.data.tasks`).

    examples = list(needle_grid(tokenizer, [1024], [0.1, 0.5, 0.9], capacity=model_capacity))
    result = retrieval_accuracy(model, tokenizer, examples, cache=DenseKVCache.for_model)
    result.exact_match, result.digit_accuracy

The decoder (greedy `generate` by default, or any registered decoder) writes
a few tokens after each prompt; the answer is the leading run of digits of
the generated text. Exact match: those digits equal the answer. Digit
accuracy: the fraction of the answer's digits reproduced at their place.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from efficient.data import Example, Tokenizer
from efficient.decoding import GenerateOutput, Greedy, generate
from efficient.models import LlamaModel

_DIGITS = re.compile(r"\s*(\d*)")


@dataclasses.dataclass(frozen=True)
class RetrievalRecord:
    task: str
    context_tokens: int
    depth: float
    answer: str
    output: str  # the generated text
    exact: bool
    digits: float  # fraction of answer digits right


@dataclasses.dataclass(frozen=True)
class RetrievalResult:
    records: tuple[RetrievalRecord, ...]

    @property
    def exact_match(self) -> float:
        return float(np.mean([r.exact for r in self.records])) if self.records else float("nan")

    @property
    def digit_accuracy(self) -> float:
        return float(np.mean([r.digits for r in self.records])) if self.records else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return dict(exact_match=self.exact_match, digit_accuracy=self.digit_accuracy,
                    records=[dataclasses.asdict(r) for r in self.records])


def score_answer(answer: str, output: str) -> tuple[bool, float]:
    """(exact match, digit accuracy) of generated `output` against the digits `answer`."""
    if not answer.isdigit():
        raise ValueError(f"answer: expected a string of digits, got {answer!r}")
    found = _DIGITS.match(output).group(1)  # type: ignore[union-attr]
    right = sum(a == b for a, b in zip(answer, found))
    return found == answer, right / len(answer)


def _greedy(model: LlamaModel, prompts: Sequence[Sequence[int]], **kwargs: Any) -> GenerateOutput:
    return generate(model, prompts, sampling=Greedy(), **kwargs)


def retrieval_accuracy(
    model: LlamaModel,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    *,
    decoder: Callable[..., GenerateOutput] | None = None,
    cache: Callable[..., Any] | None = None,
    batch_size: int = 4,
    max_new_tokens: int | None = None,
    key: jax.Array | int | None = 0,
    **options: Any,
) -> RetrievalResult:
    """Generate an answer for each example and score it.

    decoder: `fn(model, prompts, *, max_new_tokens, cache, key, stop_tokens, **options)`
        (a registered decoder); default greedy `generate`.
    max_new_tokens: default the longest answer's token count + 2.
    ValueError if a prompt plus the new tokens exceeds the model's
    max_position_embeddings.
    """
    if not examples:
        raise ValueError("examples: empty")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    decode = decoder or _greedy
    prompts = [tokenizer.encode(e.prompt) for e in examples]
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(e.answer)) for e in examples) + 2
    limit = model.config.max_position_embeddings
    for i, (e, p) in enumerate(zip(examples, prompts, strict=True)):
        if len(p) + max_new_tokens > limit:
            raise ValueError(f"examples[{i}]: context of {len(p)} tokens ({e.task}, context_tokens="
                             f"{e.context_tokens}) + {max_new_tokens} new tokens exceeds the model's "
                             f"max_position_embeddings {limit}")
    stop = tuple(model.config.eos_token_ids)
    records = []
    for s in range(0, len(examples), batch_size):
        out = decode(model, prompts[s : s + batch_size], max_new_tokens=max_new_tokens, cache=cache, key=key,
                     stop_tokens=stop, **options)
        for e, seq in zip(examples[s : s + batch_size], out.sequences(), strict=True):
            text = tokenizer.decode(seq)
            exact, digits = score_answer(e.answer, text)
            records.append(RetrievalRecord(e.task, e.context_tokens, e.depth, e.answer, text, exact, digits))
    return RetrievalResult(tuple(records))
