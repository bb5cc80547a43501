"""Code prompts for the speculative benchmark: determinism, lengths, the editing prompt
holds the original function, repetitive windows are the repetitive ones, bad input."""

from __future__ import annotations

import ast
import os
import textwrap
from pathlib import Path

import pytest

from efficient.data import ByteTokenizer, Corpus, Document, Tokenizer, load_tokenizer
from efficient.data.code_tasks import (
    TASK_KINDS,
    build_prompts,
    completion_prompts,
    editing_prompts,
    repetition_score,
    repetitive_prompts,
)

FUNCTION = """\
class Box:
    def scale(self, factor, offset=0):
        \"\"\"Scale the box.\"\"\"
        width = self.width * factor + offset
        self.factor = factor
        return width, factor
"""


@pytest.fixture(scope="module")
def held_out(stdlib: Corpus) -> list[Document]:
    return stdlib.split("test")


def _build(kind: str, docs: list[Document], tok: Tokenizer, seed: int = 0, count: int = 4, tokens: int = 128):
    return build_prompts(kind, docs, tok, count=count, prompt_tokens=tokens, seed=seed, lookahead_tokens=32,
                         min_function_tokens=32)


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_deterministic_for_a_seed(held_out: list[Document], byte_tok: ByteTokenizer, kind: str) -> None:
    first, again = _build(kind, held_out, byte_tok), _build(kind, held_out, byte_tok)
    assert first == again
    assert all(p.kind == kind for p in first)
    if kind != "repetitive":  # the most repetitive windows may coincide across seeds
        assert [p.ids for p in _build(kind, held_out, byte_tok, seed=1)] != [p.ids for p in first]


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_lengths_and_text(held_out: list[Document], byte_tok: ByteTokenizer, bpe_dir: Path, kind: str) -> None:
    for tok in (byte_tok, load_tokenizer(bpe_dir)):
        prompts = _build(kind, held_out, tok, count=3, tokens=96)
        assert len(prompts) == 3 and len({p.path for p in prompts}) == 3
        docs = {d.path: d for d in held_out}
        for p in prompts:
            assert all(isinstance(i, int) for i in p.ids)
            if kind == "editing":
                assert len(p.ids) <= 2 * 96 and p.ids == tok.encode(p.text)
            else:
                assert len(p.ids) == 96 and p.text == tok.decode(p.ids)
                line = docs[p.path].text.splitlines(keepends=True)[p.line - 1]
                assert p.text.startswith(line[: min(len(line), 20)]) or not line.strip()


def test_editing_prompt_holds_the_function(held_out: list[Document], byte_tok: ByteTokenizer) -> None:
    docs = {d.path: d for d in held_out}
    for p in editing_prompts(held_out, byte_tok, count=4, seed=3, max_tokens=600, min_lines=4):
        source, comment, first, tail = p.text.rsplit("\n", 3)
        assert tail == "" and comment == p.edit and comment.startswith("# The same function, ")
        original = source.rstrip("\n") + "\n"
        lines = docs[p.path].text.splitlines(keepends=True)
        assert textwrap.dedent("".join(lines[p.line - 1:p.line - 1 + original.count("\n")])).rstrip() + "\n" == original
        assert original.startswith(("def ", "async def ")) and original.count("\n") >= 4
        ast.parse(original)
        ast.parse(first + "\n" + p.reference)  # the edited function parses
        assert first.startswith(("def ", "async def ")) and len(p.ids) <= 600


def test_editing_renames_an_argument_used_in_the_body(byte_tok: ByteTokenizer) -> None:
    doc = Document("box.py", "box", FUNCTION)
    seen = set()
    for seed in range(8):
        (p,) = editing_prompts([doc], byte_tok, count=1, seed=seed, max_tokens=400)
        assert p.text.startswith(textwrap.dedent(FUNCTION.split("\n", 1)[1]))
        old, new = p.edit.removeprefix("# The same function, with ").removesuffix(":").split(" renamed to ")
        seen.add(old)
        edited = ast.parse(p.text.splitlines()[-1] + "\n" + p.reference).body[0]
        assert isinstance(edited, ast.FunctionDef) and p.text.splitlines()[-1].startswith("def scale(")
        arguments = [a.arg for a in (*edited.args.args, *edited.args.kwonlyargs)]
        assert new in arguments and old not in arguments
        names = {n.id for n in ast.walk(edited) if isinstance(n, ast.Name)}
        assert new in names and old not in names
        assert "self.factor" in p.reference  # attributes keep their names
    assert seen == {"factor", "offset"}


def test_editing_renames_the_function_without_usable_arguments(byte_tok: ByteTokenizer) -> None:
    doc = Document("m.py", "m", "def ping(self):\n    print('a')\n    print('b')\n    return 1\n")
    (p,) = editing_prompts([doc], byte_tok, count=1, seed=0, max_tokens=400, min_lines=3)
    assert p.edit == "# The same function, renamed to ping_v2:" and p.text.endswith("def ping_v2(self):\n")


def test_repetitive_windows_are_more_repetitive(held_out: list[Document], byte_tok: ByteTokenizer) -> None:
    rep = repetitive_prompts(held_out, byte_tok, count=4, prompt_tokens=128, seed=0, lookahead_tokens=64)
    plain = completion_prompts(held_out, byte_tok, count=8, prompt_tokens=128, seed=0)
    scores = [p.score for p in rep]
    assert scores == sorted(scores) and len({p.path for p in rep}) == 4
    assert max(repetition_score(p.text) for p in rep) < sorted(repetition_score(p.text) for p in plain)[4]
    assert repetition_score("x = 1\n" * 50) < repetition_score(os.urandom(150).hex()) < 1.0
    assert repetition_score("") == float("inf")


def test_bad_input_names_the_argument(held_out: list[Document], byte_tok: ByteTokenizer) -> None:
    docs = held_out[:3]
    with pytest.raises(ValueError, match="count"):
        completion_prompts(docs, byte_tok, count=0, prompt_tokens=8, seed=0)
    with pytest.raises(ValueError, match="prompt_tokens: only"):
        completion_prompts(docs, byte_tok, count=2, prompt_tokens=10**7, seed=0)
    with pytest.raises(ValueError, match="prompt_tokens: only"):
        repetitive_prompts(docs, byte_tok, count=4, prompt_tokens=8, seed=0)  # 3 documents, 4 asked
    with pytest.raises(ValueError, match="max_tokens"):
        editing_prompts(docs, byte_tok, count=1, seed=0, max_tokens=10)
    with pytest.raises(ValueError, match="max_tokens: only 0"):
        editing_prompts([Document("a.txt", "a", "no code here\n" * 50)], byte_tok, count=1, seed=0, max_tokens=999)
    with pytest.raises(ValueError, match="min_lines"):
        editing_prompts(docs, byte_tok, count=1, seed=0, max_tokens=999, min_lines=1)
    with pytest.raises(ValueError, match="kind"):
        build_prompts("poetry", docs, byte_tok, count=1, prompt_tokens=8, seed=0)
    with pytest.raises(TypeError, match="documents"):
        completion_prompts(["def f(): pass"], byte_tok, count=1, prompt_tokens=4, seed=0)
    with pytest.raises(ValueError, match="documents: empty"):
        completion_prompts([], byte_tok, count=1, prompt_tokens=4, seed=0)
    with pytest.raises(TypeError, match="tokenizer"):
        completion_prompts(docs, object(), count=1, prompt_tokens=4, seed=0)
