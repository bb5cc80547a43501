"""Shared fixtures for the data-layer tests: the stdlib corpus (read once) and a tiny BPE tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from efficient.data import ByteTokenizer, Corpus, Document


@pytest.fixture(scope="session")
def stdlib() -> Corpus:
    return Corpus.from_stdlib()


@pytest.fixture(scope="session")
def small_docs(stdlib: Corpus) -> list[Document]:
    """A few small held-out files (about 30-60 KB in all)."""
    docs = sorted(stdlib.split("test"), key=lambda d: (len(d.text), d.path))
    return [d for d in docs if 2_000 < len(d.text) < 8_000][:8]


@pytest.fixture(scope="session")
def byte_tok() -> ByteTokenizer:
    return ByteTokenizer()


def _train_bpe(texts: list[str], vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory, small_docs: list[Document]) -> Path:
    """A byte-level BPE tokenizer (vocab 400, specials <|endoftext|>, <pad>) saved as tokenizer.json."""
    folder = tmp_path_factory.mktemp("bpe")
    tok = _train_bpe([d.text for d in small_docs], 400, ["<|endoftext|>", "<pad>"])
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="session")
def bpe_dir_with_config(tmp_path_factory: pytest.TempPathFactory, small_docs: list[Document]) -> Path:
    """BPE with <s>, </s>, <unk> and a tokenizer_config.json naming </s> as eos and <unk> as pad."""
    folder = tmp_path_factory.mktemp("bpe_cfg")
    tok = _train_bpe([d.text for d in small_docs], 350, ["<s>", "</s>", "<unk>"])
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "pad_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
