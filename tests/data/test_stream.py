"""Training batches and evaluation windows over token streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from efficient.data import ByteTokenizer, Document, eval_windows, iter_batches, load_tokenizer, tokenize_documents


def test_batches_shape_and_determinism(small_docs: list[Document], byte_tok: ByteTokenizer) -> None:
    take = lambda seed: [b for _, b in zip(range(5), iter_batches(small_docs, byte_tok, 4, 128, seed))]
    first, again, other = take(0), take(0), take(1)
    for b in first:
        assert b.shape == (4, 129) and b.dtype == np.int32
        assert b.min() >= 0 and b.max() < byte_tok.vocab_size
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    assert any((b == byte_tok.eos_id).any() for b in first)


def test_batches_one_epoch_covers_the_stream(small_docs: list[Document], byte_tok: ByteTokenizer) -> None:
    total = sum(len(a) for a in tokenize_documents(small_docs, byte_tok))
    windows = np.concatenate(list(iter_batches(small_docs, byte_tok, 2, 64, seed=3, epochs=1)))
    assert ((total - 64) // 65) // 2 * 2 <= len(windows) <= (total // 65) // 2 * 2
    assert len({w.tobytes() for w in windows}) == len(windows)  # distinct, non-overlapping slices
    two = list(iter_batches(small_docs, byte_tok, 2, 64, seed=3, epochs=2))
    assert np.array_equal(np.concatenate(two[: len(windows) // 2]), windows)


def test_batches_errors(small_docs: list[Document], byte_tok: ByteTokenizer) -> None:
    with pytest.raises(ValueError, match="batch: .*0"):
        next(iter_batches(small_docs, byte_tok, 0, 8, 0))
    with pytest.raises(ValueError, match="seq_len"):
        next(iter_batches(["tiny"], byte_tok, 2, 8, 0))
    with pytest.raises(ValueError, match="documents"):
        next(iter_batches([], byte_tok, 2, 8, 0))


@pytest.mark.parametrize("seq_len", [1, 7, 64, 100_000])
def test_eval_windows_cover_once(small_docs: list[Document], byte_tok: ByteTokenizer, seq_len: int) -> None:
    docs = small_docs[:3] if seq_len > 1 else small_docs[:1]
    ew = eval_windows(docs, byte_tok, seq_len)
    expected = np.concatenate(tokenize_documents(docs, byte_tok))
    assert ew.tokens.shape == (len(ew.tokens), seq_len + 1) and ew.mask.shape == (len(ew.tokens), seq_len)
    assert np.array_equal(ew.tokens[:, 1:][ew.mask], expected)  # every target once, in order
    assert ew.num_tokens == len(expected) == int(ew.mask.sum())
    assert ew.num_bytes == sum(len(d.text.encode()) for d in docs)
    assert ew.tokens[0, 0] == byte_tok.eos_id
    assert np.array_equal(ew.tokens[1:, 0], ew.tokens[:-1, -1])  # no overlap: contiguous
    assert ew.mask[:-1].all()
    assert (ew.tokens[:, 1:][~ew.mask] == byte_tok.pad_id).all()


def test_eval_batches_pad_with_masked_rows(small_docs: list[Document], byte_tok: ByteTokenizer) -> None:
    ew = eval_windows(small_docs[:2], byte_tok, 256)
    got = list(ew.batches(3))
    assert all(t.shape == (3, 257) and m.shape == (3, 256) for t, m in got)
    assert sum(int(m.sum()) for _, m in got) == ew.num_tokens


def test_stream_with_hf_tokenizer(small_docs: list[Document], bpe_dir: Path) -> None:
    tok = load_tokenizer(bpe_dir)
    batch = next(iter_batches(small_docs, tok, 2, 32, 0))
    assert batch.shape == (2, 33) and batch.max() < tok.vocab_size
    ew = eval_windows(small_docs[:2], tok, 50)
    assert tok.decode(ew.tokens[:, 1:][ew.mask].tolist()) == "".join(d.text for d in small_docs[:2])
