"""Token streams from documents: training batches and evaluation windows.

Documents are joined into one stream, each followed by the tokenizer's
end-of-document id (`eos_id`). Windows are int32 [B, T+1]: inputs are
`w[:, :-1]`, targets `w[:, 1:]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from efficient.data.corpus import Document
from efficient.data.tokenizer import Tokenizer

__all__ = ["tokenize_documents", "iter_batches", "EvalWindows", "eval_windows"]


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    fast = getattr(tokenizer, "encode_array", None)
    if fast is not None:
        return np.asarray(fast(text), dtype=np.int32)
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def tokenize_documents(documents: Sequence[Document | str], tokenizer: Tokenizer) -> list[np.ndarray]:
    """Each document's ids followed by `eos_id`, as int32 arrays."""
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    texts = [d if isinstance(d, str) else d.text for d in documents]
    return [np.concatenate([_encode(tokenizer, t), eos]) for t in texts]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")


def iter_batches(
    documents: Sequence[Document | str],
    tokenizer: Tokenizer,
    batch: int,
    seq_len: int,
    seed: int,
    *,
    epochs: int | None = None,
) -> Iterator[np.ndarray]:
    """Yields shuffled int32 [batch, seq_len+1] windows; the same for a seed.

    Each epoch shuffles the document order, joins the documents (each ending
    in `eos_id`), starts at a random offset below seq_len+1, cuts the stream
    into non-overlapping windows, shuffles them, and yields full batches (the
    remainder is dropped). `epochs=None` repeats forever.
    """
    _check_positive(batch=batch, seq_len=seq_len)
    if epochs is not None:
        _check_positive(epochs=epochs)
    if len(documents) == 0:
        raise ValueError("documents: empty")
    arrays = tokenize_documents(documents, tokenizer)
    total = sum(len(a) for a in arrays)
    width = seq_len + 1
    if total < batch * width + seq_len:
        raise ValueError(
            f"seq_len: {batch} x {width} tokens (batch={batch}, seq_len={seq_len}) do not fit "
            f"in the {total} tokens of the documents"
        )
    rng = np.random.default_rng(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = rng.permutation(len(arrays))
        stream = np.concatenate([arrays[i] for i in order])
        start = int(rng.integers(0, width))
        count = (len(stream) - start) // width
        windows = stream[start : start + count * width].reshape(count, width)
        windows = windows[rng.permutation(count)]
        for b in range(count // batch):
            yield np.ascontiguousarray(windows[b * batch : (b + 1) * batch])
        epoch += 1


@dataclasses.dataclass(frozen=True)
class EvalWindows:
    """Held-out text cut into windows that score every token exactly once.

    tokens: int32 [W, T+1]; mask: bool [W, T], True where target `tokens[:, 1:]`
    is scored (padding is not). num_tokens scored targets (text tokens and one
    `eos_id` per document) cover num_bytes UTF-8 bytes, so
    bits/byte = sum of masked NLL (nats) / ln 2 / num_bytes.
    """

    tokens: np.ndarray
    mask: np.ndarray
    num_tokens: int
    num_bytes: int

    def batches(self, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(tokens [B, T+1], mask [B, T]) in order; the last is padded with masked rows of id 0."""
        _check_positive(batch=batch)
        n = len(self.tokens)
        for s in range(0, n, batch):
            tok, mask = self.tokens[s : s + batch], self.mask[s : s + batch]
            if len(tok) < batch:
                pad = batch - len(tok)
                tok = np.concatenate([tok, np.zeros((pad, tok.shape[1]), np.int32)])
                mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
            yield tok, mask


def eval_windows(documents: Sequence[Document | str], tokenizer: Tokenizer, seq_len: int) -> EvalWindows:
    """Cuts the documents into non-overlapping windows for perplexity/bits-per-byte.

    The stream is `eos_id` (a start-of-document context, as in training),
    then each document followed by `eos_id`. Window w holds stream tokens
    [w*T, w*T + T] and scores targets w*T+1 .. w*T+T, so every token after the
    first is scored exactly once; the last window is padded with `pad_id`.
    """
    _check_positive(seq_len=seq_len)
    if len(documents) == 0:
        raise ValueError("documents: empty")
    arrays = tokenize_documents(documents, tokenizer)
    stream = np.concatenate([np.array([tokenizer.eos_id], np.int32), *arrays])
    n_targets = len(stream) - 1
    count = -(-n_targets // seq_len)
    padded = np.full(count * seq_len + 1, tokenizer.pad_id, dtype=np.int32)
    padded[: len(stream)] = stream
    idx = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    tokens = padded[idx]
    mask = (idx[:, 1:] <= n_targets)
    texts = [d if isinstance(d, str) else d.text for d in documents]
    num_bytes = sum(len(t.encode("utf-8", errors="surrogatepass")) for t in texts)
    return EvalWindows(tokens=tokens, mask=mask, num_tokens=int(n_targets), num_bytes=num_bytes)
