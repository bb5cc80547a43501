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

Two tasks in English prose, for instruction-tuned models that fail on code:

- `classic_passkey`: the passkey prompt of Mohtashami & Jaggi (2023,
  "Landmark Attention", arXiv:2305.16300): a preamble, the repeated
  "The grass is green. The sky is blue. ..." filler, the line "The pass key
  is N. Remember it. N is the pass key." at the depth, and "What is the pass
  key? The pass key is". The needle sits between filler sentences (only the
  first sentence may be cut); keys have 5 digits (the paper: 1 to 50000).
- `kv_prose`: lines `KEY-dddd: ddddd` (4-digit key, 5-digit value) at depths
  inside English prose, asked with a final `KEY-dddd:` line (the key-value
  retrieval of Liu et al. 2023, "Lost in the Middle", in a line format).
  The prose is the Python language reference shipped with every CPython as
  `pydoc_data.topics` (no download; about 170 KB, some 40k tokens, of
  running text are kept): its paragraphs of running text, unwrapped to one
  line each, code blocks, grammar and headings left out (`prose_documents`).
  Needles sit between paragraphs.
"""

from __future__ import annotations

import ast
import bisect
import dataclasses
import functools
import re
import string
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from efficient.data.corpus import Corpus, Document
from efficient.data.tokenizer import Tokenizer

__all__ = [
    "Example", "passkey_example", "multikey_example", "classic_passkey_example", "kv_prose_example",
    "prose_documents", "KVStyle", "KV_STYLES", "needle_grid", "TASKS",
]


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
    """Filler units (lines, or sentences) in order, with per-unit token counts."""

    def __init__(self, units: list[str], tokenizer: Tokenizer, memo: dict[str, int] | None = None) -> None:
        memo = {} if memo is None else memo
        for u in units:
            if u not in memo:
                memo[u] = len(tokenizer.encode(u))
        self.lines = units
        self.starts = np.concatenate([[0], np.cumsum([len(x) for x in units])]).astype(np.int64)
        self.tokens = np.array([memo[u] for u in units], dtype=np.int64)
        self.text = "".join(units)

    @classmethod
    def from_documents(cls, documents: Sequence[Document | str], tokenizer: Tokenizer, min_tokens: int,
                       rng: np.random.Generator, banned: re.Pattern[str]) -> _Pool:
        """Whole documents in a seeded order, a blank line after each, until `min_tokens`."""
        texts = [t for t in (d if isinstance(d, str) else d.text for d in documents) if t.strip()]
        texts = [t if t.endswith("\n") else t + "\n" for t in texts if not banned.search(t)]
        if not texts:
            raise ValueError("documents: no usable filler text (empty, or all contain the needle names)")
        lines: list[str] = []
        memo: dict[str, int] = {}
        total = 0
        while total < min_tokens:
            for i in rng.permutation(len(texts)):
                for line in texts[i].splitlines(keepends=True) + ["\n"]:
                    lines.append(line)
                    if line not in memo:
                        memo[line] = len(tokenizer.encode(line))
                    total += memo[line]
                if total >= min_tokens:
                    break
        return cls(lines, tokenizer, memo)


def _assemble(pool: _Pool, tokenizer: Tokenizer, start: int, needles: Sequence[tuple[float, str]],
              question: str, header: str = "") -> tuple[str, list[int]]:
    """`header` + filler `pool.text[start:]` with the needles + `question`; returns the prompt
    and each needle's char offset."""
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
    pieces: list[str] = [header]
    offsets = [0] * len(needles)
    pos, k = len(header), 0
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
           make_pool: Callable[[int], _Pool], header: str = "") -> tuple[str, list[int], int]:
    """The longest prompt of at most `context_tokens` tokens: `header`, the tail of the filler of
    `make_pool(min_tokens)` with the needles at their depths, `question`. Binary search on the cut."""
    fixed = len(tokenizer.encode(header + "".join(n for _, n in needles) + question))
    if context_tokens < fixed:
        raise ValueError(
            f"context_tokens: {context_tokens} is too small to hold the needles and question ({fixed} tokens)"
        )
    want = context_tokens + context_tokens // 8 + 64

    def count(pool: _Pool, start: int) -> int:
        return len(tokenizer.encode(_assemble(pool, tokenizer, start, needles, question, header)[0]))

    pool = make_pool(want)
    while count(pool, 0) <= context_tokens:  # the search below needs more filler than fits
        want *= 2
        pool = make_pool(want)
    lo, hi = 0, len(pool.text)  # invariant: count(lo) > context_tokens >= count(hi)
    if count(pool, hi) > context_tokens:
        raise ValueError(f"context_tokens: {context_tokens} is too small to hold the needles and question")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(pool, mid) <= context_tokens:
            hi = mid
        else:
            lo = mid
    prompt, offsets = _assemble(pool, tokenizer, hi, needles, question, header)
    return prompt, offsets, len(tokenizer.encode(prompt))


def _document_pool(tokenizer: Tokenizer, documents: Sequence[Document | str], rng: np.random.Generator,
                   banned: re.Pattern[str]) -> Callable[[int], _Pool]:
    return lambda want: _Pool.from_documents(documents, tokenizer, want, rng, banned)


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
    docs = _default_documents() if documents is None else documents
    prompt, offsets, n = _build(tokenizer, context_tokens, [(float(depth), needle)], question,
                                _document_pool(tokenizer, docs, rng, banned))
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
    docs = _default_documents() if documents is None else documents
    prompt, offsets, n = _build(tokenizer, context_tokens, needles, question,
                                _document_pool(tokenizer, docs, rng, banned))
    return Example(prompt, values[query], n, float(depth), "multikey", offsets[query],
                   len(tokenizer.encode(prompt[: offsets[query]])))


# ---- prose tasks --------------------------------------------------------------------------------------

_CLASSIC_PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                     "them. I will quiz you about the important information there.\n")
_CLASSIC_FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
                   "There and back again. ")


def classic_passkey_example(tokenizer: Tokenizer, context_tokens: int, depth: float, seed: int, *,
                            documents: Sequence[Document | str] | None = None,
                            capacity: int | None = None) -> Example:
    """The passkey prompt of Mohtashami & Jaggi (2023, arXiv:2305.16300), 5-digit keys.

    `documents` is ignored: the repeated grass/sky/sun filler is part of the task.
    ValueError if `context_tokens` exceeds `capacity` or cannot hold the preamble,
    needle and question.
    """
    del documents
    _check_request(context_tokens, depth, capacity)
    rng = np.random.default_rng(seed)
    (answer,) = _digits(rng, 1)
    needle = f"\nThe pass key is {answer}. Remember it. {answer} is the pass key.\n"
    question = "\nWhat is the pass key? The pass key is"
    memo: dict[str, int] = {}

    def make_pool(want: int) -> _Pool:
        per_cycle = max(1, len(tokenizer.encode("".join(_CLASSIC_FILLER))))
        return _Pool(list(_CLASSIC_FILLER) * (want // per_cycle + 2), tokenizer, memo)

    prompt, offsets, n = _build(tokenizer, context_tokens, [(float(depth), needle)], question, make_pool,
                                header=_CLASSIC_PREAMBLE)
    return Example(prompt, answer, n, float(depth), "classic_passkey", offsets[0],
                   len(tokenizer.encode(prompt[: offsets[0]])))


def _unwrap(paragraph: str) -> str:
    return " ".join(line.strip() for line in paragraph.strip().splitlines())


def _is_prose(paragraph: str, min_words: int = 12) -> bool:
    """Running text: no indented (code, grammar, table) lines, no heading underlines, mostly letters."""
    lines = [x for x in paragraph.strip("\n").splitlines() if x.strip()]
    if not lines or any(x[:1].isspace() or x.lstrip().startswith((">>>", "*", "+-", "|")) for x in lines):
        return False
    text = _unwrap(paragraph)
    letters = sum(c.isalpha() or c == " " for c in text)
    return len(text.split()) >= min_words and letters >= 0.85 * len(text)


def _stdlib_docstrings() -> list[str]:
    """Module docstrings of the stdlib: the fallback prose where `pydoc_data` is stripped."""
    out = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8", errors="replace")))
        except (SyntaxError, ValueError):
            continue
        if doc:
            out.append(doc)
    return out


@functools.lru_cache(maxsize=1)
def prose_documents() -> tuple[str, ...]:
    """English prose on every CPython without downloads: the language reference topics of
    `pydoc_data.topics` (the text behind `help("if")`), one document per topic, each a
    paragraph of running text per line; code blocks, grammar and headings dropped.
    Falls back to the stdlib's module docstrings where `pydoc_data` is missing."""
    try:
        from pydoc_data.topics import topics
        sources = [topics[k] for k in sorted(topics)]
    except ImportError:  # pragma: no cover - stripped CPython builds
        sources = _stdlib_docstrings()
    docs = []
    for text in sources:
        paragraphs = [_unwrap(x) for x in re.split(r"\n[ \t]*\n", text) if _is_prose(x)]
        if paragraphs:
            docs.append("".join(x + "\n" for x in paragraphs))
    return tuple(docs)


@dataclasses.dataclass(frozen=True)
class KVStyle:
    """The wording of a `kv_prose` prompt: `preamble` opens it; `needle` and `question` are
    formatted with `key` and `value`; `question` ends the prompt."""

    preamble: str = ""
    needle: str = "KEY-{key}: {value}\n"
    question: str = "KEY-{key}:"


# Wordings measured on SmolLM2-135M-Instruct (plain completion, transformers, float32; details in
# the passkey experiment's results). With "plain" the model often copies a distractor's value
# when the queried line is early (2k tokens, depth 0.1: 0/2). "quiz" (a preamble in the words of
# Mohtashami & Jaggi's, the question asked in words before the KEY line) fixed those (3/3), but
# with 5 keys it still copies a distractor at 4k-8k (exact 0.9, 0.9, 0.7, 0.4 at 1k/2k/4k/8k);
# with 1 key it scores 1.0, 1.0, 0.9, 0.4 (8k: the model loses prose-buried lines at depth <= 0.5).
KV_STYLES: dict[str, KVStyle] = {
    "plain": KVStyle(),
    "quiz": KVStyle(
        preamble=("There are a few important KEY lines hidden inside a lot of irrelevant text. "
                  "Find them and memorize them. I will quiz you about them.\n"),
        question="\nWhat is the value of KEY-{key}? Answer with the line from the text.\nKEY-{key}:",
    ),
}


def kv_prose_example(tokenizer: Tokenizer, context_tokens: int, depth: float, seed: int, *,
                     num_keys: int = 5, style: str = "quiz",
                     documents: Sequence[Document | str] | None = None,
                     capacity: int | None = None) -> Example:
    """`num_keys` lines `KEY-dddd: ddddd` inside English prose; the prompt ends asking one key.

    Key-value retrieval (Liu et al. 2023, "Lost in the Middle", arXiv:2307.03172) in the line
    format of a passkey test. The queried line (chosen by the seed) sits at `depth`, the others
    at seeded uniform depths; keys are distinct 4-digit, values distinct 5-digit numbers.
    `documents`: the filler (default `prose_documents()`); `style`: a name in `KV_STYLES`.
    """
    _check_request(context_tokens, depth, capacity)
    if not isinstance(num_keys, (int, np.integer)) or not (1 <= num_keys <= 100):
        raise ValueError(f"num_keys: expected an int in [1, 100], got {num_keys!r}")
    if style not in KV_STYLES:
        raise ValueError(f"style: expected one of {sorted(KV_STYLES)}, got {style!r}")
    form = KV_STYLES[style]
    rng = np.random.default_rng(seed)
    keys = [str(int(k)) for k in rng.choice(9000, size=num_keys, replace=False) + 1000]
    values = _digits(rng, num_keys)
    query = int(rng.integers(num_keys))
    depths = [float(x) for x in rng.uniform(0.0, 1.0, num_keys)]
    depths[query] = float(depth)
    needles = [(d, form.needle.format(key=k, value=v)) for d, k, v in zip(depths, keys, values)]
    question = form.question.format(key=keys[query], value="")
    docs = prose_documents() if documents is None else documents
    pool = _document_pool(tokenizer, docs, rng, re.compile(r"KEY-\d"))
    prompt, offsets, n = _build(tokenizer, context_tokens, needles, question, pool, header=form.preamble)
    return Example(prompt, values[query], n, float(depth), "kv_prose", offsets[query],
                   len(tokenizer.encode(prompt[: offsets[query]])))


TASKS: dict[str, Callable[..., Example]] = {
    "passkey": passkey_example,
    "multikey": multikey_example,
    "classic_passkey": classic_passkey_example,
    "kv_prose": kv_prose_example,
}


def needle_grid(tokenizer: Tokenizer, context_lengths: Sequence[int], depths: Sequence[float], *,
                task: str = "passkey", samples: int = 1, seed: int = 0,
                documents: Sequence[Document | str] | None = None, capacity: int | None = None,
                **task_kwargs: int) -> Iterator[Example]:
    """Examples for every (context length, depth, sample), in that order.

    Each cell's seed derives from (seed, length, depth, sample index), so a
    cell does not depend on the rest of the grid. Every length and depth is
    validated when called, before any example is built. `documents=None`:
    each task's own filler (held-out stdlib code, or prose).
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    if not isinstance(samples, (int, np.integer)) or samples <= 0:
        raise ValueError(f"samples: expected a positive int, got {samples!r}")
    for n in context_lengths:
        for d in depths:
            _check_request(n, d, capacity)
    make = TASKS[task]

    def generate() -> Iterator[Example]:
        for n in context_lengths:
            for d in depths:
                for k in range(samples):
                    cell = np.random.SeedSequence([seed, int(n), round(float(d) * 1_000_000), k])
                    cell_seed = int(cell.generate_state(1)[0])
                    yield make(tokenizer, n, d, cell_seed, documents=documents, capacity=capacity, **task_kwargs)

    return generate()
