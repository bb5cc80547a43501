"""Corpora, tokenizers, token streams and synthetic long-context tasks."""

from efficient.data.corpus import SPLITS, STDLIB_EXCLUDED_DIRS, Corpus, Document, split_of
from efficient.data.gguf_tokenizer import GGUFTokenizer
from efficient.data.stream import EvalWindows, eval_windows, iter_batches, tokenize_documents
from efficient.data.tasks import TASKS, Example, multikey_example, needle_grid, passkey_example
from efficient.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    bytes_per_token,
    check_vocab,
    load_tokenizer,
)

__all__ = [
    "SPLITS",
    "STDLIB_EXCLUDED_DIRS",
    "TASKS",
    "ByteTokenizer",
    "Corpus",
    "Document",
    "EvalWindows",
    "Example",
    "GGUFTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "bytes_per_token",
    "check_vocab",
    "eval_windows",
    "iter_batches",
    "load_tokenizer",
    "multikey_example",
    "needle_grid",
    "passkey_example",
    "split_of",
    "tokenize_documents",
]
