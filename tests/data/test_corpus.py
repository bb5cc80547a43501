"""The stdlib corpus and folder corpora: file selection, module grouping, splits."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from efficient.data import SPLITS, Corpus, split_of


def test_stdlib_files_selected(stdlib: Corpus) -> None:
    paths = [d.path for d in stdlib.documents]
    assert len(paths) > 300 and paths == sorted(paths)
    assert all(p.endswith(".py") for p in paths)
    for part in ("test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data"):
        assert not any(part in p.split("/")[:-1] for p in paths), part
    assert not any(p.startswith("_sysconfigdata_") for p in paths)
    assert "os.py" in paths and "asyncio/events.py" in paths
    modules = {d.path: d.module for d in stdlib.documents}
    assert modules["os.py"] == "os" and modules["asyncio/events.py"] == "asyncio"


def test_stdlib_splits_disjoint_by_module_and_nonempty(stdlib: Corpus) -> None:
    by_split = {s: stdlib.split(s) for s in SPLITS}
    assert sum(len(v) for v in by_split.values()) == len(stdlib.documents)
    modules = {s: {d.module for d in docs} for s, docs in by_split.items()}
    for s in SPLITS:
        assert by_split[s], s
        assert modules[s] == set(stdlib.modules(s))
    assert not (modules["train"] & modules["validation"])
    assert not (modules["train"] & modules["test"])
    assert not (modules["validation"] & modules["test"])
    stats = stdlib.stats()
    assert stats["train"]["bytes"] > 5 * (stats["validation"]["bytes"] + stats["test"]["bytes"])


def test_split_is_a_pure_function_of_the_module_name(stdlib: Corpus) -> None:
    # Pinned: these must never change, or models trained earlier would be evaluated on training data.
    assert split_of("asyncio") == "train"
    assert split_of("importlib") == "test"
    assert split_of("functools") == "validation"
    again = Corpus("/elsewhere", reversed(stdlib.documents))
    assert [d.path for d in again.split("test")] == [d.path for d in stdlib.split("test")]
    other_salt = Corpus(stdlib.root, stdlib.documents, salt="other")
    assert other_salt.modules("test") != stdlib.modules("test")


def test_fractions() -> None:
    names = [f"module_{i}" for i in range(4000)]
    counts = {s: sum(split_of(n, (0.8, 0.1, 0.1)) == s for n in names) for s in SPLITS}
    assert abs(counts["train"] / 4000 - 0.8) < 0.03
    assert abs(counts["validation"] / 4000 - 0.1) < 0.02
    assert all(split_of(n, (1.0, 0.0, 0.0)) == "train" for n in names[:100])
    for bad in [(0.9, 0.05), (0.9, 0.2, 0.1), (1.1, -0.05, -0.05)]:
        with pytest.raises(ValueError, match="fractions"):
            split_of("os", bad)  # type: ignore[arg-type]


def _write_tree(root: Path, files: dict[str, bytes], order: list[str]) -> None:
    for rel in order:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(files[rel])


def test_from_folder(tmp_path: Path) -> None:
    files = {f"pkg{i}/sub/f{j}.txt": f"text {i} {j}\n".encode() for i in range(30) for j in range(3)}
    files |= {f"top{i}.md": b"# top\n" for i in range(30)}
    files |= {".hidden/x.txt": b"x", "pkg0/__pycache__/a.pyc": b"x", "blob.bin": b"\x00\x01binary"}
    order = list(files)
    a, b = tmp_path / "a", tmp_path / "b"
    _write_tree(a, files, order)
    random.Random(0).shuffle(order)
    _write_tree(b, files, order)
    ca, cb = Corpus.from_folder(a), Corpus.from_folder(b)
    assert len(ca.documents) == 120
    assert {d.module for d in ca.documents} == {f"pkg{i}" for i in range(30)} | {f"top{i}" for i in range(30)}
    for s in SPLITS:
        assert [(d.path, d.text) for d in ca.split(s)] == [(d.path, d.text) for d in cb.split(s)]
    assert {d.path for d in Corpus.from_folder(a, suffixes=(".md",)).documents} == {f"top{i}.md" for i in range(30)}


def test_from_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty_corpus"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_corpus"):
        Corpus.from_folder(empty)
    (empty / "only.bin").write_bytes(b"\x00" * 10)
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="empty_corpus"):
        Corpus.from_folder(empty, suffixes=(".py",))
    with pytest.raises(NotADirectoryError, match="missing_dir"):
        Corpus.from_folder(tmp_path / "missing_dir")
    with pytest.raises(ValueError, match="empty_corpus"):
        Corpus.from_stdlib(root=empty)
    corpus = Corpus.from_folder(empty)
    with pytest.raises(ValueError, match="'dev'"):
        corpus.split("dev")
