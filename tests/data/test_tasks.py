"""Synthetic retrieval tasks: determinism, needle placement, lengths, errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient.data import ByteTokenizer, Document, Example, Tokenizer, load_tokenizer, multikey_example
from efficient.data import needle_grid, passkey_example


def _check_depth(ex: Example, tok: Tokenizer, needle: str, question: str, other_needles: str = "") -> None:
    """The needle starts at the filler line boundary nearest depth x filler tokens."""
    assert ex.prompt[ex.needle_char :].startswith(needle)
    assert ex.needle_token == len(tok.encode(ex.prompt[: ex.needle_char]))
    filler = ex.prompt[: -len(question)].replace(needle, "", 1)
    for line in other_needles.splitlines(keepends=True):
        filler = filler.replace(line, "", 1)
    filler_tokens = len(tok.encode(filler))
    before = ex.prompt[: ex.needle_char]
    for line in other_needles.splitlines(keepends=True):
        before = before.replace(line, "", 1)
    longest = max((len(tok.encode(x)) for x in filler.splitlines(keepends=True)), default=0)
    assert before == "" or before.endswith("\n")
    assert abs(len(tok.encode(before)) - ex.depth * filler_tokens) <= longest / 2 + 2


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_byte(small_docs: list[Document], byte_tok: ByteTokenizer, depth: float) -> None:
    ex = passkey_example(byte_tok, 1000, depth, seed=7, documents=small_docs)
    assert ex.task == "passkey" and ex.depth == depth
    assert re.fullmatch(r"\d{5}", ex.answer)
    assert ex.context_tokens == len(byte_tok.encode(ex.prompt)) and 997 <= ex.context_tokens <= 1000
    assert ex.prompt.endswith("\nassert PASSKEY == ")
    assert ex.prompt.count("PASSKEY") == 2
    _check_depth(ex, byte_tok, f"PASSKEY = {ex.answer}\n", "assert PASSKEY == ")
    if depth == 0.0:
        assert ex.needle_char == 0 and ex.needle_token == 0
    if depth == 1.0:
        assert ex.prompt.endswith(f"PASSKEY = {ex.answer}\nassert PASSKEY == ")


def test_passkey_deterministic(small_docs: list[Document], byte_tok: ByteTokenizer) -> None:
    a = passkey_example(byte_tok, 600, 0.4, seed=1, documents=small_docs)
    assert a == passkey_example(byte_tok, 600, 0.4, seed=1, documents=small_docs)
    b = passkey_example(byte_tok, 600, 0.4, seed=2, documents=small_docs)
    assert a.prompt != b.prompt


def test_passkey_default_documents_and_long_context(byte_tok: ByteTokenizer) -> None:
    ex = passkey_example(byte_tok, 16384, 0.75, seed=0)
    assert 16381 <= ex.context_tokens <= 16384
    _check_depth(ex, byte_tok, f"PASSKEY = {ex.answer}\n", "assert PASSKEY == ")


def test_passkey_bpe_length(small_docs: list[Document], bpe_dir: Path) -> None:
    tok = load_tokenizer(bpe_dir)
    for seed, n in enumerate([64, 300, 1500]):
        ex = passkey_example(tok, n, 0.3, seed=seed, documents=small_docs)
        assert ex.context_tokens == len(tok.encode(ex.prompt))
        assert n - 4 <= ex.context_tokens <= n
        _check_depth(ex, tok, f"PASSKEY = {ex.answer}\n", "assert PASSKEY == ")


def test_multikey(small_docs: list[Document], byte_tok: ByteTokenizer) -> None:
    ex = multikey_example(byte_tok, 2000, 0.6, seed=5, num_keys=5, documents=small_docs)
    assert ex.task == "multikey" and ex.context_tokens <= 2000
    keys = dict(re.findall(r"^(KEY_[A-E]) = (\d{5})$", ex.prompt, flags=re.M))
    assert sorted(keys) == ["KEY_A", "KEY_B", "KEY_C", "KEY_D", "KEY_E"]
    assert len(set(keys.values())) == 5
    query = re.fullmatch(r"(?s).*\nassert (KEY_[A-E]) == ", ex.prompt).group(1)
    assert keys[query] == ex.answer
    assert len(re.findall(r"\bKEY_[A-Z]\b", ex.prompt)) == 6
    others = "".join(f"{k} = {v}\n" for k, v in keys.items() if k != query)
    _check_depth(ex, byte_tok, f"{query} = {ex.answer}\n", f"assert {query} == ", others)
    assert ex == multikey_example(byte_tok, 2000, 0.6, seed=5, num_keys=5, documents=small_docs)


def test_grid(small_docs: list[Document], byte_tok: ByteTokenizer) -> None:
    grid = list(needle_grid(byte_tok, [256, 512], [0.0, 0.5, 1.0], samples=2, seed=3, documents=small_docs))
    assert [(e.context_tokens // 16, e.depth) for e in grid[::2]] == [(16, 0.0), (16, 0.5), (16, 1.0),
                                                                        (32, 0.0), (32, 0.5), (32, 1.0)]
    assert all(e.context_tokens <= n for e, n in zip(grid, [256] * 6 + [512] * 6))
    assert grid[0].prompt != grid[1].prompt  # samples differ
    sub = list(needle_grid(byte_tok, [512], [0.5], samples=1, seed=3, documents=small_docs))
    assert sub[0] == grid[8]  # a cell does not depend on the rest of the grid
    multi = next(needle_grid(byte_tok, [400], [0.2], task="multikey", num_keys=3, documents=small_docs))
    assert multi.task == "multikey"


def test_errors(small_docs: list[Document], byte_tok: ByteTokenizer) -> None:
    with pytest.raises(ValueError, match="context_tokens: 4096 exceeds the model capacity 2048"):
        passkey_example(byte_tok, 4096, 0.5, 0, documents=small_docs, capacity=2048)
    with pytest.raises(ValueError, match="context_tokens: 4096"):
        needle_grid(byte_tok, [1024, 4096], [0.5], capacity=2048, documents=small_docs)  # eager
    with pytest.raises(ValueError, match="context_tokens: 20 is too small"):
        passkey_example(byte_tok, 20, 0.5, 0, documents=small_docs)
    with pytest.raises(ValueError, match="context_tokens: .*got 0"):
        passkey_example(byte_tok, 0, 0.5, 0, documents=small_docs)
    with pytest.raises(ValueError, match="depth: .*got 1.5"):
        passkey_example(byte_tok, 512, 1.5, 0, documents=small_docs)
    with pytest.raises(ValueError, match="num_keys: .*got 27"):
        multikey_example(byte_tok, 512, 0.5, 0, num_keys=27, documents=small_docs)
    with pytest.raises(ValueError, match="task: .*got 'nope'"):
        needle_grid(byte_tok, [512], [0.5], task="nope")
    with pytest.raises(ValueError, match="documents"):
        passkey_example(byte_tok, 512, 0.5, 0, documents=["PASSKEY = 1\n", "  \n"])
    tiny = passkey_example(byte_tok, 34, 0.5, 0, documents=small_docs)  # needle + question only
    assert tiny.context_tokens == 34 and tiny.prompt == f"PASSKEY = {tiny.answer}\nassert PASSKEY == "


@settings(max_examples=25, deadline=None)
@given(n=st.integers(34, 3000), depth=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_passkey_properties(small_docs: list[Document], n: int, depth: float, seed: int) -> None:
    tok = ByteTokenizer()
    ex = passkey_example(tok, n, depth, seed, documents=small_docs)
    assert n - 3 <= ex.context_tokens <= n
    _check_depth(ex, tok, f"PASSKEY = {ex.answer}\n", "assert PASSKEY == ")
