"""Held-out code prompts for the speculative decoding benchmark (Spec-Bench style).

    prompts = build_prompts("repetitive", documents, tokenizer, count=4, prompt_tokens=256, seed=0)
    prompts[0].ids, prompts[0].text

Three task kinds, each a deterministic function of (documents, tokenizer, seed):

- `completion`: `prompt_tokens` tokens starting at a seeded line of a document
  (one prompt per document): ordinary code completion.
- `repetitive`: the most repetitive windows. Each document offers
  `candidates` windows of `prompt_tokens + lookahead_tokens` tokens starting at
  seeded lines; a window's score is its zlib compression ratio,
  `len(zlib.compress(utf8, 9)) / len(utf8)` (lower: more repeated structure:
  tables, similar branches, runs of near-identical calls); the `count`
  lowest-scoring windows of distinct documents are kept and the prompt is the
  first `prompt_tokens` tokens of each, so the continuation the model writes
  lies inside the scored region.
- `editing`: rewrite a function with a small change. A function (found with
  `ast`, at least `min_lines` lines) is followed by a comment describing the
  edit (rename an argument used in the body, or, when there is none, the
  function) and the first line of the edited function; the expected
  continuation copies most of the original (`CodePrompt.reference`, for
  inspection only: the benchmark measures copy-heavy generation speed, not the
  correctness of the edit).

Prompts carry no special tokens. Too few suitable documents or functions is
a ValueError naming the argument to change.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import textwrap
import tokenize
import zlib
from collections.abc import Sequence

import numpy as np

from efficient.data.corpus import Document
from efficient.data.tokenizer import Tokenizer

__all__ = ["TASK_KINDS", "CodePrompt", "build_prompts", "completion_prompts", "editing_prompts",
           "repetition_score", "repetitive_prompts"]

TASK_KINDS: tuple[str, ...] = ("completion", "repetitive", "editing")


@dataclasses.dataclass(frozen=True)
class CodePrompt:
    """One prompt: token ids and their text, where it came from, and task details."""

    kind: str
    ids: list[int]
    text: str
    path: str  # the document's path in the corpus
    line: int  # 1-based line of the document where the prompt (editing: the function) starts
    score: float | None = None  # repetitive: the window's zlib compression ratio
    edit: str = ""  # editing: the comment line describing the edit
    reference: str = ""  # editing: the rest of the edited function (what a perfect copy writes)


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _check_inputs(documents: Sequence[Document], tokenizer: Tokenizer) -> None:
    if isinstance(documents, str | Document) or not all(isinstance(d, Document) for d in documents):
        raise TypeError("documents: expected a sequence of efficient.data.Document")
    if not documents:
        raise ValueError("documents: empty")
    if not callable(getattr(tokenizer, "encode", None)) or not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"tokenizer: expected an efficient.data.Tokenizer, got {type(tokenizer).__name__}")


def _line_starts(text: str) -> list[int]:
    return [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 < len(text)]


def _tokens_from(text: str, start: int, n: int, tokenizer: Tokenizer) -> list[int] | None:
    """The first `n` tokens of text[start:], encoding a growing slice; None if it has fewer."""
    size = 4 * n
    while True:
        ids = tokenizer.encode(text[start:start + size])
        if len(ids) >= n + 1 or start + size >= len(text):  # +1: the slice end may split a token
            return ids[:n] if len(ids) >= n else None
        size *= 2


def _line_of(text: str, char: int) -> int:
    return text.count("\n", 0, char) + 1


def completion_prompts(documents: Sequence[Document], tokenizer: Tokenizer, *, count: int, prompt_tokens: int,
                       seed: int) -> list[CodePrompt]:
    """`count` prompts of `prompt_tokens` tokens, each at a seeded line of a different document
    (from the document's start when the rest after that line is too short)."""
    _check_inputs(documents, tokenizer)
    count, prompt_tokens = _check_int("count", count, 1), _check_int("prompt_tokens", prompt_tokens, 1)
    rng = np.random.default_rng(seed)
    prompts: list[CodePrompt] = []
    for i in rng.permutation(len(documents)):
        doc = documents[int(i)]
        starts = _line_starts(doc.text)
        start = starts[int(rng.integers(len(starts)))]
        ids = _tokens_from(doc.text, start, prompt_tokens, tokenizer)
        if ids is None:
            start, ids = 0, _tokens_from(doc.text, 0, prompt_tokens, tokenizer)
        if ids is not None:
            prompts.append(CodePrompt("completion", ids, tokenizer.decode(ids), doc.path, _line_of(doc.text, start)))
            if len(prompts) == count:
                return prompts
    raise ValueError(f"prompt_tokens: only {len(prompts)} of the {len(documents)} documents hold {prompt_tokens} "
                     f"tokens but count={count} prompts were asked for")


def repetition_score(text: str) -> float:
    """zlib compression ratio of the UTF-8 text (lower: more repetitive); inf for empty text."""
    data = text.encode("utf-8", errors="surrogatepass")
    return len(zlib.compress(data, 9)) / len(data) if data else float("inf")


def repetitive_prompts(documents: Sequence[Document], tokenizer: Tokenizer, *, count: int, prompt_tokens: int,
                       seed: int, lookahead_tokens: int | None = None, candidates: int = 16) -> list[CodePrompt]:
    """The `count` most repetitive windows (lowest `repetition_score` of prompt + lookahead
    tokens) among `candidates` seeded line starts per document, one per document."""
    _check_inputs(documents, tokenizer)
    count, prompt_tokens = _check_int("count", count, 1), _check_int("prompt_tokens", prompt_tokens, 1)
    lookahead = _check_int("lookahead_tokens", prompt_tokens // 2 if lookahead_tokens is None else lookahead_tokens, 0)
    candidates = _check_int("candidates", candidates, 1)
    rng = np.random.default_rng(seed)
    best: list[tuple[float, str, int, CodePrompt]] = []
    for doc in documents:
        starts = _line_starts(doc.text)
        picks = rng.choice(len(starts), size=min(candidates, len(starts)), replace=False)
        scored = []
        for start in sorted({starts[int(j)] for j in picks}):
            ids = _tokens_from(doc.text, start, prompt_tokens + lookahead, tokenizer)
            if ids is not None:
                scored.append((repetition_score(tokenizer.decode(ids)), start, ids))
        if scored:
            score, start, ids = min(scored, key=lambda x: (x[0], x[1]))
            prompt = ids[:prompt_tokens]
            best.append((score, doc.path, start, CodePrompt("repetitive", prompt, tokenizer.decode(prompt),
                                                            doc.path, _line_of(doc.text, start), score=score)))
    if len(best) < count:
        raise ValueError(f"prompt_tokens: only {len(best)} of the {len(documents)} documents hold "
                         f"{prompt_tokens} + {lookahead} tokens but count={count} prompts were asked for")
    return [p for *_, p in sorted(best, key=lambda x: x[:3])[:count]]


# ----------------------------------------------------------------------------- editing
def _functions(text: str) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def _renamed(source: str, old: str, new: str) -> str:
    """`source` with every NAME token `old` not after a '.' replaced by `new` (via `tokenize`)."""
    lines = source.splitlines(keepends=True)
    spots, previous = [], None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.string == old and previous != ".":
            spots.append(tok.start)
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            previous = tok.string
    for row, col in reversed(spots):
        line = lines[row - 1]
        lines[row - 1] = line[:col] + new + line[col + len(old):]
    return "".join(lines)


def _edit_for(node: ast.FunctionDef | ast.AsyncFunctionDef, rng: np.random.Generator) -> tuple[str, str, str]:
    """(old name, new name, comment): rename an argument used in the body, else the function."""
    a = node.args
    params = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x is not None]
    used = {n.id for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.Name)}
    names = used | set(params) | {node.name}
    options = [p for p in params if p not in ("self", "cls") and p in used]
    if options:
        old = options[int(rng.integers(len(options)))]
        forms = [f"new_{old}", f"{old}_value", f"the_{old}", f"{old}2"]
        new = next(f for f in forms[int(rng.integers(len(forms))):] + forms if f not in names)
        return old, new, f"# The same function, with {old} renamed to {new}:"
    new = next(f for f in (f"{node.name}_v2", f"{node.name}_new", f"{node.name}2") if f not in names)
    return node.name, new, f"# The same function, renamed to {new}:"


def editing_prompts(documents: Sequence[Document], tokenizer: Tokenizer, *, count: int, seed: int,
                    max_tokens: int, min_lines: int = 4, min_function_tokens: int = 0) -> list[CodePrompt]:
    """`count` edit prompts from distinct documents: function source + edit comment + the
    edited function's first line, at most `max_tokens` tokens; functions have at least
    `min_lines` lines and `min_function_tokens` tokens (e.g. max_new_tokens, so the whole
    continuation can be a copy)."""
    _check_inputs(documents, tokenizer)
    count, max_tokens = _check_int("count", count, 1), _check_int("max_tokens", max_tokens, 1)
    min_lines = _check_int("min_lines", min_lines, 2)
    min_function_tokens = _check_int("min_function_tokens", min_function_tokens, 0)
    rng = np.random.default_rng(seed)
    prompts: list[CodePrompt] = []
    for i in rng.permutation(len(documents)):
        doc = documents[int(i)]
        lines = doc.text.splitlines(keepends=True)
        found = []
        for node in _functions(doc.text):
            if node.end_lineno is None or node.end_lineno - node.lineno + 1 < min_lines:
                continue
            source = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno])).rstrip() + "\n"
            if not source.startswith(("def ", "async def ")):
                continue  # a multi-line string less indented than the def: not self-contained
            function_ids = tokenizer.encode(source)
            if not min_function_tokens <= len(function_ids) < max_tokens:
                continue
            found.append((node, source))
        while found:
            node, source = found.pop(int(rng.integers(len(found))))
            old, new, comment = _edit_for(node, rng)
            try:
                edited = _renamed(source, old, new)
            except (tokenize.TokenError, IndentationError, SyntaxError):
                continue
            first, _, rest = edited.partition("\n")
            text = f"{source}\n{comment}\n{first}\n"
            ids = tokenizer.encode(text)
            if len(ids) <= max_tokens:
                prompts.append(CodePrompt("editing", ids, text, doc.path, node.lineno, edit=comment,
                                          reference=rest))
                break
        if len(prompts) == count:
            return prompts
    raise ValueError(f"max_tokens: only {len(prompts)} of the {len(documents)} documents hold a function of "
                     f">= {min_lines} lines and >= {min_function_tokens} tokens whose edit prompt fits in "
                     f"{max_tokens} tokens, but count={count} prompts were asked for")


def build_prompts(kind: str, documents: Sequence[Document], tokenizer: Tokenizer, *, count: int,
                  prompt_tokens: int, seed: int, lookahead_tokens: int | None = None,
                  editing_max_tokens: int | None = None, editing_min_lines: int = 4,
                  min_function_tokens: int = 0) -> list[CodePrompt]:
    """Prompts of one task kind (see the module docstring); `prompt_tokens` is the exact
    length of completion/repetitive prompts; editing prompts have at most
    `editing_max_tokens` (default 2 * prompt_tokens)."""
    if kind == "completion":
        return completion_prompts(documents, tokenizer, count=count, prompt_tokens=prompt_tokens, seed=seed)
    if kind == "repetitive":
        return repetitive_prompts(documents, tokenizer, count=count, prompt_tokens=prompt_tokens, seed=seed,
                                  lookahead_tokens=lookahead_tokens)
    if kind == "editing":
        limit = 2 * _check_int("prompt_tokens", prompt_tokens, 1) if editing_max_tokens is None else editing_max_tokens
        return editing_prompts(documents, tokenizer, count=count, seed=seed, max_tokens=limit,
                               min_lines=editing_min_lines, min_function_tokens=min_function_tokens)
    raise ValueError(f"kind: expected one of {TASK_KINDS}, got {kind!r}")
