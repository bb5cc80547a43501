"""Does the model use long context? Bits/byte of the same text given more and more of
what precedes it.

From each held-out file with at least max(contexts) + 1 tokens (the longest files of
the split; a file is one document, never a concatenation), take its first
max(contexts) + 1 tokens; for every context length c, the window is the c + 1 tokens
that end there, and only the last `tail` targets are scored. Every context thus scores
the same tokens, and bits/byte (summed NLL / ln 2 / the tail's UTF-8 bytes) falls with
c exactly as far as the model uses the extra context. One cacheless forward per
window (blockwise attention past the threshold, so memory stays linear in c).
Run through `experiments.run`; configs/long_context.py.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from matplotlib.figure import Figure

from efficient.data import Document, EvalWindows, Tokenizer, tokenize_documents
from efficient.eval import perplexity
from experiments.common import (
    ExperimentResult,
    check_positive,
    format_table,
    load_documents,
    load_model,
    load_tokenizer_for,
)


@dataclasses.dataclass(frozen=True)
class Settings:
    model_path: str
    tokenizer: str
    dtype: str
    source: str
    suffixes: tuple[str, ...] | None
    split: str
    contexts: tuple[int, ...]
    tail: int
    files: int

    def __post_init__(self) -> None:
        check_positive(self, "tail", "files")
        if (not self.contexts or any(not isinstance(c, int) or isinstance(c, bool) for c in self.contexts)
                or list(self.contexts) != sorted(set(self.contexts)) or self.contexts[0] < self.tail):
            raise ValueError(f"config.contexts: expected increasing ints, each >= config.tail {self.tail}, "
                             f"got {self.contexts!r}")


def settings_from(config: ml_collections.ConfigDict) -> Settings:
    return Settings(model_path=str(config.model.path), tokenizer=config.model.tokenizer, dtype=config.model.dtype,
                    source=config.data.source, suffixes=tuple(config.data.suffixes) if config.data.suffixes else None,
                    split=config.data.split, contexts=tuple(config.contexts), tail=config.tail, files=config.files)


def long_files(documents: list[Document], tokenizer: Tokenizer, length: int, count: int) -> list[tuple[str, np.ndarray]]:
    """(path, first `length` token ids) of up to `count` files with at least `length` tokens,
    the longest first (ties by path)."""
    arrays = tokenize_documents(documents, tokenizer)
    ranked = sorted(((len(a), d.path, a) for d, a in zip(documents, arrays, strict=True) if len(a) >= length),
                    key=lambda x: (-x[0], x[1]))
    return [(path, np.asarray(a[:length], np.int32)) for _, path, a in ranked[:count]]


def context_windows(files: list[tuple[str, np.ndarray]], context: int, tail: int, tokenizer: Tokenizer) -> EvalWindows:
    """Per file, the `context` + 1 tokens ending at its end; the last `tail` targets scored."""
    tokens = np.stack([ids[len(ids) - context - 1:] for _, ids in files])
    mask = np.zeros((len(files), context), bool)
    mask[:, -tail:] = True
    num_bytes = int(tokenizer.num_bytes(tokens[:, 1:][mask].tolist()))
    return EvalWindows(tokens=tokens, mask=mask, num_tokens=int(mask.sum()), num_bytes=num_bytes)


def plot(rows: list[dict[str, Any]], title: str) -> Figure:
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([r["context"] for r in rows], [r["bits_per_byte"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens before the scored tail")
    ax.set_ylabel("bits/byte of the same tail (lower is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> ExperimentResult:
    s = settings_from(config)
    model = load_model(s.model_path, dtype=s.dtype)
    limit = model.config.max_position_embeddings
    if s.contexts[-1] + 1 > limit:
        raise ValueError(f"config.contexts: {s.contexts[-1]} + 1 tokens exceed the model's "
                         f"max_position_embeddings {limit}")
    tokenizer = load_tokenizer_for(s.model_path, s.tokenizer, model.config.vocab_size)
    documents = load_documents(s.source, s.suffixes, s.split)
    files = long_files(documents, tokenizer, s.contexts[-1] + 1, s.files)
    if not files:
        raise ValueError(f"config.data: no {s.split} file has {s.contexts[-1] + 1} tokens")
    rows = []
    for context in s.contexts:
        start = time.perf_counter()
        windows = context_windows(files, context, s.tail, tokenizer)
        result = perplexity(model, windows, batch_size=1)
        rows.append(dict(context=context, **result.as_dict(), seconds=time.perf_counter() - start))
        log(f"[long_context] context {context}: bits/byte {result.bits_per_byte:.4f} over {result.tokens} "
            f"tokens ({rows[-1]['seconds']:.1f} s)")
    metrics = dict(rows=rows, files=[dict(path=p, tokens=len(ids)) for p, ids in files], tail=s.tail,
                   model=dict(path=s.model_path, dtype=s.dtype, parameters=model.config.num_parameters()))
    columns = (("context", "context", "d"), ("bits_per_byte", "bits/byte", ".4f"),
               ("nats_per_token", "nats/token", ".4f"), ("tokens", "scored", "d"), ("seconds", "s", ".1f"))
    table = format_table(rows, columns) + f"\n{len(files)} files, last {s.tail} tokens of each scored"
    title = f"{s.model_path}: {len(files)} {s.split} files, last {s.tail} tokens scored"
    return ExperimentResult(metrics=metrics, table=table, figures={"bits_per_byte": plot(rows, title)})
