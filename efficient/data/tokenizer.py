"""Tokenizers: the `Tokenizer` protocol, the embedded `ByteTokenizer`, and
`HFTokenizer` (a `tokenizer.json` read with the `tokenizers` package).

Bits per byte needs the number of UTF-8 bytes a token sequence stands for;
every tokenizer reports it with `num_bytes(ids)` (special tokens count 0).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from efficient.data.gguf_tokenizer import GGUFTokenizer

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "check_vocab",
    "bytes_per_token",
]


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer needs from a tokenizer.

    `encode` adds no special tokens; `decode` drops them. `bos_id` may be None
    for tokenizers without one; `eos_id` (the end-of-document separator) and
    `pad_id` always exist.
    """

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int | None: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def num_bytes(self, ids: Sequence[int]) -> int: ...


def check_text(text: object) -> str:
    """TypeError unless `text` is a str (bytes are refused: decode them first)."""
    if not isinstance(text, str):
        hint = " (decode bytes to str first)" if isinstance(text, bytes | bytearray) else ""
        raise TypeError(f"text: expected a str, got {type(text).__name__}{hint}")
    return text


def check_token_ids(ids: object, vocab_size: int) -> np.ndarray:
    """`ids` as a flat int64 array: a sequence (or array) of integer ids in [0, vocab_size).

    TypeError for None, str/bytes or non-integers (floats are refused, never truncated);
    ValueError for an id outside the vocabulary.
    """
    if ids is None or isinstance(ids, str | bytes | bytearray):
        raise TypeError(f"ids: expected a sequence of integer token ids, got {type(ids).__name__}")
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError) as e:
        raise TypeError(f"ids: expected a sequence of integer token ids: {e}") from e
    if arr.size == 0:
        return np.zeros((0,), np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"ids: expected integer token ids, got {arr.dtype} values like {arr.reshape(-1)[0]!r}")
    arr = arr.astype(np.int64).reshape(-1)
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        raise ValueError(f"ids: {int(arr[bad][0])} is outside the vocabulary [0, {vocab_size})")
    return arr


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, then PAD=256, BOS=257, EOS=258.

    `vocab_size` is the true number of ids, 259. Rounding the embedding table
    up (e.g. to 264 or 384 rows for aligned matmuls) is the model's business:
    `check_vocab` accepts any model vocabulary at least this large.

    Any `str` round-trips: lone surrogates are encoded with 'surrogatepass'.
    Invalid byte sequences decode with U+FFFD replacement characters.
    """

    PAD: int = 256
    BOS: int = 257
    EOS: int = 258

    @property
    def vocab_size(self) -> int:
        return 259

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def eos_id(self) -> int:
        return self.EOS

    @property
    def pad_id(self) -> int:
        return self.PAD

    def encode(self, text: str) -> list[int]:
        """Returns the UTF-8 bytes of `text` as ids."""
        return list(check_text(text).encode("utf-8", errors="surrogatepass"))

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int32 array, without a Python list (fast path)."""
        data = check_text(text).encode("utf-8", errors="surrogatepass")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes byte ids, skipping special ids; invalid bytes become U+FFFD."""
        arr = check_token_ids(ids, self.vocab_size)
        data = arr[arr < 256].astype(np.uint8).tobytes()
        try:
            return data.decode("utf-8", errors="surrogatepass")
        except UnicodeDecodeError:
            return data.decode("utf-8", errors="replace")

    def num_bytes(self, ids: Sequence[int]) -> int:
        """Number of byte (non-special) ids."""
        return int((check_token_ids(ids, self.vocab_size) < 256).sum())

    def __repr__(self) -> str:
        return "ByteTokenizer()"


_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>", "[SEP]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def _token_name(value: object) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HFTokenizer:
    """A `tokenizers.Tokenizer` read from `<folder>/tokenizer.json`.

    Special tokens come from the arguments, else `tokenizer_config.json` next
    to it, else common names (`</s>`, `<|endoftext|>`, ...). A tokenizer without
    an end-of-sequence token raises ValueError; `pad_id` falls back to `eos_id`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        from tokenizers import Tokenizer as _HFTok

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"path: no tokenizer file at {str(self.path)!r}")
        try:
            self._tok = _HFTok.from_file(str(self.path))
        except Exception as e:  # the tokenizers package raises a plain Exception on a bad file
            raise ValueError(f"path: cannot read tokenizer file {str(self.path)!r} (corrupt or not a "
                             f"tokenizers JSON file): {e}") from e
        config = self._read_config(self.path.parent / "tokenizer_config.json")
        self._bos = self._resolve("bos_token", bos_token, config, _BOS_NAMES)
        eos = self._resolve("eos_token", eos_token, config, _EOS_NAMES)
        if eos is None:
            raise ValueError(f"path: no end-of-sequence token found in {str(self.path)!r}; pass eos_token=")
        self._eos = eos
        pad = self._resolve("pad_token", pad_token, config, _PAD_NAMES)
        self._pad = eos if pad is None else pad
        self._special = {i for i in (self._bos, self._eos, self._pad) if i is not None}

    @staticmethod
    def _read_config(path: Path) -> dict:
        if not path.is_file():
            return {}
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"path: tokenizer config {str(path)!r} is not valid JSON: {e}") from e
        return config if isinstance(config, dict) else {}

    def _resolve(self, key: str, explicit: str | None, config: dict, names: tuple[str, ...]) -> int | None:
        if explicit is not None:
            found = self._tok.token_to_id(explicit)
            if found is None:
                raise ValueError(f"{key}: {explicit!r} is not in the vocabulary of {str(self.path)!r}")
            return found
        candidates = [_token_name(config.get(key))] + list(names)
        for name in candidates:
            if name is not None and (found := self._tok.token_to_id(name)) is not None:
                return found
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(check_text(text), add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(check_token_ids(ids, self.vocab_size).tolist(), skip_special_tokens=True)

    def num_bytes(self, ids: Sequence[int]) -> int:
        """UTF-8 bytes of the decoded non-special tokens.

        Exact for whole texts; a slice that cuts a multi-byte character counts
        its replacement character (3 bytes) instead.
        """
        kept = [i for i in check_token_ids(ids, self.vocab_size).tolist() if i not in self._special]
        return len(self.decode(kept).encode("utf-8", errors="surrogatepass"))

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r})"


def load_tokenizer(folder: str | Path) -> HFTokenizer | GGUFTokenizer:
    """Loads `<folder>/tokenizer.json`, or the tokenizer of a `.gguf` file path;
    FileNotFoundError naming the path if absent."""
    if not isinstance(folder, str | os.PathLike):
        raise TypeError(f"folder: expected a path (str or Path), got {type(folder).__name__}")
    if Path(folder).suffix.lower() == ".gguf" and not Path(folder).is_dir():
        from efficient.data.gguf_tokenizer import GGUFTokenizer

        return GGUFTokenizer.from_file(folder)
    if Path(folder).is_file():
        raise ValueError(f"folder: {str(folder)!r} is a file; expected a folder holding tokenizer.json "
                         "or a .gguf file")
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"folder: no tokenizer.json at {str(path)!r}")
    return HFTokenizer(path)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, *, exact: bool = False) -> None:
    """Raises ValueError unless every token id fits the model's embedding.

    A model vocabulary larger than the tokenizer's (padded rows) is accepted
    unless `exact`.
    """
    if not isinstance(model_vocab_size, (int, np.integer)) or model_vocab_size <= 0:
        raise ValueError(f"model_vocab_size: expected a positive int, got {model_vocab_size!r}")
    size = tokenizer.vocab_size
    if size > model_vocab_size:
        raise ValueError(
            f"model_vocab_size: {model_vocab_size} is smaller than the vocabulary of {tokenizer!r} ({size})"
        )
    if exact and size != model_vocab_size:
        raise ValueError(f"model_vocab_size: {model_vocab_size} != vocabulary of {tokenizer!r} ({size})")


def bytes_per_token(tokenizer: Tokenizer, text: str) -> float:
    """UTF-8 bytes per token of `text`: bits/byte = (nats/token) / ln 2 / this."""
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("text: encodes to no tokens")
    return len(text.encode("utf-8", errors="surrogatepass")) / len(ids)
