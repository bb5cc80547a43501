"""Synthetic long-context retrieval tasks built from real code.

A prompt is a long Python "file" of filler code (whole stdlib files in a
seeded order, cut so that only the first line may be partial), with needle
lines such as `PASSKEY = 48213` inserted at line boundaries, ending with a
question such as `assert PASSKEY == `; the answer is the digits.

Length: `context_tokens` is measured with the given tokenizer. The prompt
never exceeds it and falls short by at most a few tokens: at most 3 with
`ByteTokenizer` (one UTF-8 character), a few for BPE tokenizers whose merges
are not additive. `Example.context_tokens` is the exact count.

Depth: a needle at depth d starts at the filler line boundary nearest to
d x (filler tokens), so it is off by at most half the longest line around it;
d=0 is the file's first line, d=1 right before the question. Needles are
written at column 0 even inside an indented block (the file is not meant to
compile), and documents containing a needle name are left out of the filler.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
import string
from collections.abc import Iterator, Sequence

import numpy as np

from efficient.data.corpus import Corpus, Document
from efficient.data.tokenizer import Tokenizer

__all__ = ["Example", "passkey_example", "multikey_example", "needle_grid", "TASKS"]


@dataclasses.dataclass(frozen=True)
class Example:
    """One retrieval prompt. `needle_char`/`needle_token` locate the queried needle line."""

    prompt: str
    answer: str
    context_tokens: int
    depth: float
    task: str
    needle_char: int
    needle_token: int


def _default_documents() -> list[Document]:
    return Corpus.from_stdlib().split("test")


def _check_request(context_tokens: int, depth: float, capacity: int | None) -> None:
    if not isinstance(context_tokens, (int, np.integer)) or context_tokens <= 0:
        raise ValueError(f"context_tokens: expected a positive int, got {context_tokens!r}")
    if capacity is not None and context_tokens > capacity:
        raise ValueError(f"context_tokens: {context_tokens} exceeds the model capacity {capacity}")
    if not (0.0 <= float(depth) <= 1.0):
        raise ValueError(f"depth: expected a value in [0, 1], got {depth!r}")


class _Pool:
    """Filler code: documents in a seeded order, with per-line token counts."""

    def __init__(self, documents: Sequence[Document | str], tokenizer: Tokenizer, min_tokens: int,
                 rng: np.random.Generator, banned: re.Pattern[str]) -> None:
        texts = [t for t in (d if isinstance(d, str) else d.text for d in documents) if t.strip()]
        texts = [t if t.endswith("\n") else t + "\n" for t in texts if not banned.search(t)]
        if not texts:
            raise ValueError("documents: no usable filler text (empty, or all contain the needle names)")
        lines: list[str] = []
        counts: list[int] = []
        total = 0
        while total < min_tokens:
            for i in rng.permutation(len(texts)):
                for line in texts[i].splitlines(keepends=True) + ["\n"]:
                    lines.append(line)
                    counts.append(len(tokenizer.encode(line)))
                    total += counts[-1]
                if total >= min_tokens:
                    break
        self.lines = lines
        self.starts = np.concatenate([[0], np.cumsum([len(x) for x in lines])]).astype(np.int64)
        self.tokens = np.array(counts, dtype=np.int64)
        self.text = "".join(lines)


def _assemble(pool: _Pool, tokenizer: Tokenizer, start: int, needles: Sequence[tuple[float, str]],
              question: str) -> tuple[str, list[int]]:
    """The prompt for filler `pool.text[start:]`; returns it and each needle's char offset."""
    j = bisect.bisect_right(pool.starts, start) - 1
    if j >= len(pool.lines):  # no filler
        lines: list[str] = []
        counts = np.zeros(0, np.int64)
    else:
        first = pool.lines[j][start - pool.starts[j]:]
        lines = [first] + pool.lines[j + 1:]
        counts = np.concatenate([[len(tokenizer.encode(first))], pool.tokens[j + 1:]])
    cum = np.concatenate([[0], np.cumsum(counts)])
    total = cum[-1]
    at = [int(np.argmin(np.abs(cum - d * total))) for d, _ in needles]
    order = sorted(range(len(needles)), key=lambda i: (at[i], i))
    pieces: list[str] = []
    offsets = [0] * len(needles)
    pos, k = 0, 0
    for i in order:
        chunk = "".join(lines[k:at[i]])
        pieces.append(chunk)
        pos += len(chunk)
        offsets[i] = pos
        pieces.append(needles[i][1])
        pos += len(needles[i][1])
        k = at[i]
    pieces.append("".join(lines[k:]))
    pieces.append(question)
    return "".join(pieces), offsets


def _build(tokenizer: Tokenizer, context_tokens: int, needles: Sequence[tuple[float, str]], question: str,
           documents: Sequence[Document | str] | None, rng: np.random.Generator,
           banned: re.Pattern[str]) -> tuple[str, list[int], int]:
    fixed = len(tokenizer.encode("".join(n for _, n in needles) + question))
    if context_tokens < fixed:
        raise ValueError(
            f"context_tokens: {context_tokens} is too small to hold the needles and question ({fixed} tokens)"
        )
    docs = _default_documents() if documents is None else documents
    want = context_tokens + context_tokens // 8 + 64

    def count(pool: _Pool, start: int) -> int:
        return len(tokenizer.encode(_assemble(pool, tokenizer, start, needles, question)[0]))

    pool = _Pool(docs, tokenizer, want, rng, banned)
    while count(pool, 0) <= context_tokens:  # the search below needs more filler than fits
        want *= 2
        pool = _Pool(docs, tokenizer, want, rng, banned)
    lo, hi = 0, len(pool.text)  # invariant: count(lo) > context_tokens >= count(hi)
    if count(pool, hi) > context_tokens:
        raise ValueError(f"context_tokens: {context_tokens} is too small to hold the needles and question")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(pool, mid) <= context_tokens:
            hi = mid
        else:
            lo = mid
    prompt, offsets = _assemble(pool, tokenizer, hi, needles, question)
    return prompt, offsets, len(tokenizer.encode(prompt))


def _digits(rng: np.random.Generator, n: int) -> list[str]:
    values = rng.choice(90000, size=n, replace=False) + 10000
    return [str(int(v)) for v in values]


def passkey_example(tokenizer: Tokenizer, context_tokens: int, depth: float, seed: int, *,
                    documents: Sequence[Document | str] | None = None,
                    capacity: int | None = None) -> Example:
    """`PASSKEY = <5 digits>` at `depth`; the prompt ends with `assert PASSKEY == `.

    `documents` supply the filler (default: the stdlib corpus' test split).
    ValueError if `context_tokens` exceeds `capacity` or cannot hold the needle.
    """
    _check_request(context_tokens, depth, capacity)
    rng = np.random.default_rng(seed)
    (answer,) = _digits(rng, 1)
    needle = f"PASSKEY = {answer}\n"
    question = "assert PASSKEY == "
    banned = re.compile(r"\bPASSKEY\b")
    prompt, offsets, n = _build(tokenizer, context_tokens, [(float(depth), needle)], question,
                                documents, rng, banned)
    return Example(prompt, answer, n, float(depth), "passkey", offsets[0],
                   len(tokenizer.encode(prompt[: offsets[0]])))


def multikey_example(tokenizer: Tokenizer, context_tokens: int, depth: float, seed: int, *,
                     num_keys: int = 4, documents: Sequence[Document | str] | None = None,
                     capacity: int | None = None) -> Example:
    """`KEY_A = ...`, `KEY_B = ...`, ... at different depths; asks for one.

    The queried key (chosen by the seed) sits at `depth`, the others at random
    depths; the prompt ends with `assert KEY_<X> == `.
    """
    _check_request(context_tokens, depth, capacity)
    if not isinstance(num_keys, (int, np.integer)) or not (1 <= num_keys <= 26):
        raise ValueError(f"num_keys: expected an int in [1, 26], got {num_keys!r}")
    rng = np.random.default_rng(seed)
    values = _digits(rng, num_keys)
    names = [f"KEY_{c}" for c in string.ascii_uppercase[:num_keys]]
    query = int(rng.integers(num_keys))
    depths = [float(x) for x in rng.uniform(0.0, 1.0, num_keys)]
    depths[query] = float(depth)
    needles = [(d, f"{name} = {v}\n") for d, name, v in zip(depths, names, values)]
    question = f"assert {names[query]} == "
    banned = re.compile(r"\bKEY_[A-Z]\b")
    prompt, offsets, n = _build(tokenizer, context_tokens, needles, question, documents, rng, banned)
    return Example(prompt, values[query], n, float(depth), "multikey", offsets[query],
                   len(tokenizer.encode(prompt[: offsets[query]])))


TASKS = {"passkey": passkey_example, "multikey": multikey_example}


def needle_grid(tokenizer: Tokenizer, context_lengths: Sequence[int], depths: Sequence[float], *,
                task: str = "passkey", samples: int = 1, seed: int = 0,
                documents: Sequence[Document | str] | None = None, capacity: int | None = None,
                **task_kwargs: int) -> Iterator[Example]:
    """Examples for every (context length, depth, sample), in that order.

    Each cell's seed derives from (seed, length, depth, sample index), so a
    cell does not depend on the rest of the grid. Every length and depth is
    validated when called, before any example is built.
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    if not isinstance(samples, (int, np.integer)) or samples <= 0:
        raise ValueError(f"samples: expected a positive int, got {samples!r}")
    for n in context_lengths:
        for d in depths:
            _check_request(n, d, capacity)
    docs = _default_documents() if documents is None else documents
    make = TASKS[task]

    def generate() -> Iterator[Example]:
        for n in context_lengths:
            for d in depths:
                for k in range(samples):
                    cell = np.random.SeedSequence([seed, int(n), round(float(d) * 1_000_000), k])
                    cell_seed = int(cell.generate_state(1)[0])
                    yield make(tokenizer, n, d, cell_seed, documents=docs, capacity=capacity, **task_kwargs)

    return generate()
