"""Text corpora split by module: the Python standard library, or any folder.

A document's *module* is the first component of its path under the root (the
top-level package, or the file name without suffix for a top-level file).
Every module goes wholly to one split, chosen by a stable hash (SHA-256) of
the salted module name, so the split of a module never depends on the file
system's order, on the machine, or on which other modules exist.

The stdlib corpus is the `.py` files under `sysconfig.get_paths()["stdlib"]`,
excluding third-party code, tests, generated data and build artefacts
(`STDLIB_EXCLUDED_DIRS`, `config-*/`, the machine-specific `_sysconfigdata_*`).
Which files exist varies with the Python version (modules come and go: e.g.
`distutils` and `lib2to3` are gone in 3.12/3.13), so the corpus, but never
the split of a given module name, changes with it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path

__all__ = ["Document", "Corpus", "SPLITS", "STDLIB_EXCLUDED_DIRS", "split_of"]

SPLITS: tuple[str, ...] = ("train", "validation", "test")

# Directory names never descended into in the stdlib: third-party packages,
# bytecode, C extensions, the build config (config-*), test suites (test/,
# tests/, idlelib/idle_test, lib2to3/tests, tkinter/test, unittest/test, ...)
# and pydoc_data (a generated 750 KB string of English help text, not code).
STDLIB_EXCLUDED_DIRS: frozenset[str] = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "lib-dynload", "test", "tests", "idle_test", "pydoc_data"}
)


@dataclasses.dataclass(frozen=True)
class Document:
    """One text file: `path` is relative to the corpus root, '/'-separated."""

    path: str
    module: str
    text: str


def _check_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(not (0.0 <= f <= 1.0) for f in fractions):
        raise ValueError(f"fractions: expected 3 values in [0, 1] (train, validation, test), got {fractions!r}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions: must sum to 1, got {fractions!r} (sum {sum(fractions)})")
    return tuple(float(f) for f in fractions)  # type: ignore[return-value]


def split_of(module: str, fractions: tuple[float, float, float] = (0.9, 0.05, 0.05), salt: str = "efficient") -> str:
    """The split ('train', 'validation' or 'test') a module name belongs to."""
    fractions = _check_fractions(fractions)
    digest = hashlib.sha256(f"{salt}:{module}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "validation"
    return "test"


def _module_of(relpath: str) -> str:
    first = relpath.split("/", 1)[0]
    return first if "/" in relpath else first.split(".", 1)[0]


def _scan(
    root: Path, *, suffixes: tuple[str, ...] | None, excluded_dirs: frozenset[str], stdlib: bool
) -> list[Document]:
    """Reads the matching files under `root`, sorted by relative path."""
    relpaths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d
            for d in dirnames
            if d not in excluded_dirs and not d.startswith(".") and not (stdlib and d.startswith("config-"))
        ]
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if name.startswith(".") or (suffixes is not None and not name.endswith(suffixes)):
                continue
            if stdlib and name.startswith("_sysconfigdata_"):
                continue
            relpaths.append(name if rel_dir == "." else f"{rel_dir}/{name}")
    docs = []
    for rel in sorted(relpaths):
        data = (root / rel).read_bytes()
        if b"\0" in data[:8192]:  # binary, not text
            continue
        docs.append(Document(rel, _module_of(rel), data.decode("utf-8", errors="replace")))
    return docs


class Corpus:
    """Documents of one root folder, split train / validation / test by module."""

    def __init__(
        self,
        root: str | Path,
        documents: Iterable[Document],
        *,
        fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
        salt: str = "efficient",
    ) -> None:
        self.root = Path(root)
        self.documents: tuple[Document, ...] = tuple(sorted(documents, key=lambda d: d.path))
        if not self.documents:
            raise ValueError(f"root: no documents in {str(self.root)!r}")
        self.fractions = _check_fractions(fractions)
        self.salt = salt

    @classmethod
    def from_stdlib(
        cls,
        root: str | Path | None = None,
        *,
        fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
        salt: str = "efficient",
    ) -> Corpus:
        """The `.py` files of the standard library (or of `root`, laid out like it).

        The folder is read once per process and cached.
        """
        folder = Path(sysconfig.get_paths()["stdlib"] if root is None else root).resolve()
        docs = _read_cached(str(folder), (".py",), STDLIB_EXCLUDED_DIRS, True)
        return cls(folder, docs, fractions=fractions, salt=salt)

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        *,
        suffixes: tuple[str, ...] | None = None,
        fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
        salt: str = "efficient",
    ) -> Corpus:
        """Every text file under `path` (or those ending in `suffixes`).

        Hidden files and folders, `__pycache__` and binary files (a NUL byte in
        the first 8 KiB) are skipped; text is read as UTF-8 with replacement.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise NotADirectoryError(f"path: {str(folder)!r} is not a folder")
        docs = _scan(folder.resolve(), suffixes=suffixes, excluded_dirs=frozenset({"__pycache__"}), stdlib=False)
        if not docs:
            raise ValueError(f"path: no text files in folder {str(folder)!r} (suffixes={suffixes!r})")
        return cls(folder.resolve(), docs, fractions=fractions, salt=salt)

    def split_of(self, module: str) -> str:
        """The split a module belongs to under this corpus' fractions and salt."""
        return split_of(module, self.fractions, self.salt)

    def modules(self, split: str | None = None) -> list[str]:
        """Sorted module names, all or those of one split."""
        names = sorted({d.module for d in self.documents})
        if split is None:
            return names
        _check_split(split)
        return [m for m in names if self.split_of(m) == split]

    def split(self, name: str) -> list[Document]:
        """The documents of split `name`, sorted by path. May be empty for tiny corpora."""
        _check_split(name)
        return [d for d in self.documents if self.split_of(d.module) == name]

    def stats(self) -> dict[str, dict[str, int]]:
        """Per split: number of modules, files, and UTF-8 bytes."""
        out = {s: {"modules": 0, "files": 0, "bytes": 0} for s in SPLITS}
        for s in SPLITS:
            docs = self.split(s)
            out[s] = {
                "modules": len({d.module for d in docs}),
                "files": len(docs),
                "bytes": sum(len(d.text.encode("utf-8", errors="surrogatepass")) for d in docs),
            }
        return out

    def __repr__(self) -> str:
        return f"Corpus(root={str(self.root)!r}, documents={len(self.documents)}, fractions={self.fractions})"


def _check_split(name: str) -> None:
    if name not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {name!r}")


@functools.lru_cache(maxsize=4)
def _read_cached(
    folder: str, suffixes: tuple[str, ...], excluded: frozenset[str], stdlib: bool
) -> tuple[Document, ...]:
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"root: {folder!r} is not a folder")
    docs = tuple(_scan(root, suffixes=suffixes, excluded_dirs=excluded, stdlib=stdlib))
    if not docs:
        raise ValueError(f"root: no .py files in folder {folder!r}")
    return docs
