"""Synthetic retrieval tasks: determinism, needle placement, lengths, errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient.data import ByteTokenizer, Document, Example, Tokenizer, load_tokenizer, multikey_example
from efficient.data import needle_grid, passkey_example
from efficient.data.tasks import KV_STYLES, classic_passkey_example, kv_prose_example, prose_documents


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


# ---- prose tasks: classic_passkey (Mohtashami & Jaggi 2023) and kv_prose ----------------------------------

CLASSIC_HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                  "I will quiz you about the important information there.\n")
CLASSIC_QUESTION = "\nWhat is the pass key? The pass key is"


def _check_unit_depth(ex: Example, tok: Tokenizer, header: str, needle: str, question: str,
                      others: list[str], units: list[str]) -> None:
    """The queried needle starts at the filler unit boundary nearest depth x filler tokens."""
    assert ex.prompt.startswith(header) and ex.prompt.endswith(question)
    assert ex.prompt[ex.needle_char :].startswith(needle)
    assert ex.needle_token == len(tok.encode(ex.prompt[: ex.needle_char]))
    before = ex.prompt[len(header) : ex.needle_char]
    after = ex.prompt[ex.needle_char + len(needle) : len(ex.prompt) - len(question)]
    for other in others:
        before, after = before.replace(other, "", 1), after.replace(other, "", 1)
    total = len(tok.encode(before)) + len(tok.encode(after))
    longest = max(len(tok.encode(u)) for u in units)
    assert abs(len(tok.encode(before)) - ex.depth * total) <= longest / 2 + 2


def _kv_parts(ex: Example, style: str = "quiz") -> tuple[str, str, list[str]]:
    """(queried needle line, question, other needle lines) of a kv_prose prompt."""
    query = re.fullmatch(r"(?s).*\n(KEY-\d{4}):", ex.prompt).group(1)
    lines = re.findall(r"^KEY-\d{4}: \d{5}\n", ex.prompt, flags=re.M)
    needle = f"{query}: {ex.answer}\n"
    assert needle in lines
    return needle, KV_STYLES[style].question.format(key=query[4:]), [x for x in lines if x != needle]


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_classic_passkey_byte(byte_tok: ByteTokenizer, depth: float) -> None:
    ex = classic_passkey_example(byte_tok, 1500, depth, seed=3)
    assert ex.task == "classic_passkey" and re.fullmatch(r"\d{5}", ex.answer)
    assert ex.context_tokens == len(byte_tok.encode(ex.prompt)) and 1497 <= ex.context_tokens <= 1500
    needle = f"\nThe pass key is {ex.answer}. Remember it. {ex.answer} is the pass key.\n"
    assert ex.prompt.count(ex.answer) == 2 and "The grass is green." in ex.prompt
    units = ["The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
             "There and back again. "]
    _check_unit_depth(ex, byte_tok, CLASSIC_HEADER, needle, CLASSIC_QUESTION, [], units)
    if depth == 0.0:
        assert ex.prompt.startswith(CLASSIC_HEADER + needle)
    if depth == 1.0:
        assert ex.prompt.endswith(needle + CLASSIC_QUESTION)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.7, 1.0])
def test_kv_prose_byte(byte_tok: ByteTokenizer, depth: float) -> None:
    ex = kv_prose_example(byte_tok, 3000, depth, seed=11)
    assert ex.task == "kv_prose" and 2997 <= ex.context_tokens <= 3000
    assert ex.context_tokens == len(byte_tok.encode(ex.prompt))
    needle, question, others = _kv_parts(ex)
    assert len(others) == 4 and len({x.split(":")[0] for x in [needle, *others]}) == 5  # distinct keys
    assert len({x.split(": ")[1] for x in [needle, *others]}) == 5  # distinct values
    assert ex.prompt.count(needle.split()[0]) == 2  # the needle and the final line
    assert question.endswith(needle.split()[0]) and ex.prompt.endswith(question)
    preamble = KV_STYLES["quiz"].preamble
    filler_lines = ex.prompt[len(preamble) : -len(question)].splitlines(keepends=True)
    _check_unit_depth(ex, byte_tok, preamble, needle, question, others, [x for x in filler_lines if x not in others])
    plain = kv_prose_example(byte_tok, 3000, depth, seed=11, style="plain")
    needle, question, others = _kv_parts(plain, "plain")
    assert question == needle.split()[0] and plain.answer == ex.answer
    filler_lines = plain.prompt[: -len(question)].splitlines(keepends=True)
    _check_unit_depth(plain, byte_tok, "", needle, question, others, [x for x in filler_lines if x not in others])


def test_prose_tasks_bpe_lengths(bpe_dir: Path) -> None:
    tok = load_tokenizer(bpe_dir)
    for seed, n in enumerate([320, 900, 2500]):
        for make in (classic_passkey_example, kv_prose_example):
            ex = make(tok, n, 0.4, seed=seed)
            assert ex.context_tokens == len(tok.encode(ex.prompt)) and n - 4 <= ex.context_tokens <= n, (make, n)
            assert ex.needle_token == len(tok.encode(ex.prompt[: ex.needle_char]))
            assert abs(ex.needle_token - 0.4 * n) < 0.4 * n * 0.5 + 60  # roughly at the depth


def test_prose_tasks_deterministic_by_seed(byte_tok: ByteTokenizer) -> None:
    for make in (classic_passkey_example, kv_prose_example):
        a = make(byte_tok, 1200, 0.5, seed=1)
        assert a == make(byte_tok, 1200, 0.5, seed=1)
        b = make(byte_tok, 1200, 0.5, seed=2)
        assert a.answer != b.answer and a.prompt != b.prompt


def test_kv_prose_options(byte_tok: ByteTokenizer, small_docs: list[Document]) -> None:
    one = kv_prose_example(byte_tok, 800, 0.5, seed=4, num_keys=1)
    assert len(re.findall(r"^KEY-\d{4}: \d{5}$", one.prompt, flags=re.M)) == 1
    code = kv_prose_example(byte_tok, 800, 0.5, seed=4, documents=small_docs)  # any filler
    assert "KEY-" in code.prompt and code.prompt != kv_prose_example(byte_tok, 800, 0.5, seed=4).prompt
    for name, style in KV_STYLES.items():
        ex = kv_prose_example(byte_tok, 900, 0.5, seed=5, style=name)
        assert ex.prompt.startswith(style.preamble) and 897 <= ex.context_tokens <= 900


def test_prose_documents_are_prose() -> None:
    docs = prose_documents()
    assert len(docs) >= 20 and sum(map(len, docs)) > 100_000  # enough for 8k-token prompts
    lines = [x for d in docs for x in d.splitlines()]
    assert all(x and not x[0].isspace() and len(x.split()) >= 12 for x in lines)
    assert not any("KEY-" in d for d in docs)


def test_grid_of_prose_tasks(byte_tok: ByteTokenizer) -> None:
    grid = list(needle_grid(byte_tok, [600, 900], [0.2, 0.8], task="kv_prose", samples=1, seed=2, num_keys=3))
    assert [e.task for e in grid] == ["kv_prose"] * 4
    assert [e.depth for e in grid] == [0.2, 0.8, 0.2, 0.8] and all(e.context_tokens <= 900 for e in grid)
    classic = next(needle_grid(byte_tok, [700], [0.5], task="classic_passkey"))
    assert classic.prompt.startswith(CLASSIC_HEADER)


def test_prose_task_errors(byte_tok: ByteTokenizer) -> None:
    for make in (classic_passkey_example, kv_prose_example):
        with pytest.raises(ValueError, match="context_tokens: 9000 exceeds the model capacity 8184"):
            make(byte_tok, 9000, 0.5, 0, capacity=8184)
        with pytest.raises(ValueError, match="context_tokens: 30 is too small"):
            make(byte_tok, 30, 0.5, 0)
        with pytest.raises(ValueError, match="context_tokens: .*got -5"):
            make(byte_tok, -5, 0.5, 0)
        with pytest.raises(ValueError, match="depth: .*got -0.1"):
            make(byte_tok, 512, -0.1, 0)
    with pytest.raises(ValueError, match="num_keys: .*got 0"):
        kv_prose_example(byte_tok, 512, 0.5, 0, num_keys=0)
    with pytest.raises(ValueError, match="style: .*got 'loud'"):
        kv_prose_example(byte_tok, 512, 0.5, 0, style="loud")
    with pytest.raises(ValueError, match="documents: no usable filler"):
        kv_prose_example(byte_tok, 512, 0.5, 0, documents=["KEY-1234: 5\n"])
