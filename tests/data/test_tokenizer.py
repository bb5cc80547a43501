"""ByteTokenizer round trips, HFTokenizer loading, vocabulary checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient.data import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    bytes_per_token,
    check_vocab,
    load_tokenizer,
)


def test_byte_tokenizer_ids() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 259
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    assert tok.encode_array("aé").dtype == np.int32
    assert tok.encode_array("aé").tolist() == tok.encode("aé")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.num_bytes(ids) == len(text.encode("utf-8"))


def test_byte_round_trip_lone_surrogate() -> None:
    tok = ByteTokenizer()
    text = "a\ud800b"
    assert tok.decode(tok.encode(text)) == text


def test_byte_decode_invalid_and_specials() -> None:
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 97, 0xC3]) == "\ufffda\ufffd"
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id, tok.pad_id]) == "hi"
    assert tok.num_bytes([tok.bos_id, 104, 105, tok.eos_id]) == 2
    with pytest.raises(ValueError, match="259"):
        tok.decode([104, 259])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])


def test_load_hf_tokenizer(bpe_dir: Path) -> None:
    tok = load_tokenizer(bpe_dir)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.vocab_size == 400
    assert tok.eos_id == tok.encode("<|endoftext|>")[0] == 0
    assert tok.pad_id == 1 and tok.bos_id is None
    text = "def f(x):\n    return x + 1  # ünïcode\n"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode())  # merges happened
    assert tok.decode(ids) == text
    assert tok.num_bytes(ids + [tok.eos_id]) == len(text.encode())
    assert 1.0 < bytes_per_token(tok, text) < 8.0


def test_hf_tokenizer_config_and_overrides(bpe_dir_with_config: Path) -> None:
    tok = load_tokenizer(bpe_dir_with_config)
    vocab = {t: tok.encode(t)[0] for t in ("<s>", "</s>", "<unk>")}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (vocab["<s>"], vocab["</s>"], vocab["<unk>"])
    assert tok.decode([tok.bos_id, *tok.encode("x = 1"), tok.eos_id]) == "x = 1"
    other = HFTokenizer(bpe_dir_with_config / "tokenizer.json", eos_token="<s>")
    assert other.eos_id == vocab["<s>"]
    with pytest.raises(ValueError, match="eos_token"):
        HFTokenizer(bpe_dir_with_config / "tokenizer.json", eos_token="<nope>")


def test_hf_tokenizer_without_eos(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as T
    from tokenizers import models, pre_tokenizers

    raw = T(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="end-of-sequence"):
        load_tokenizer(tmp_path)
    tok = HFTokenizer(tmp_path / "tokenizer.json", eos_token="[UNK]")
    assert tok.encode("a b a") == [0, 1, 0] and tok.vocab_size == 3


def test_load_tokenizer_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        load_tokenizer(tmp_path)


def test_check_vocab(bpe_dir: Path) -> None:
    check_vocab(ByteTokenizer(), 259)
    check_vocab(ByteTokenizer(), 264)
    with pytest.raises(ValueError, match="model_vocab_size: 256"):
        check_vocab(ByteTokenizer(), 256)
    with pytest.raises(ValueError, match="model_vocab_size: 264"):
        check_vocab(ByteTokenizer(), 264, exact=True)
    with pytest.raises(ValueError, match="model_vocab_size"):
        check_vocab(ByteTokenizer(), 0)
    tok = load_tokenizer(bpe_dir)
    check_vocab(tok, 400, exact=True)
    with pytest.raises(ValueError, match="399"):
        check_vocab(tok, 399)
