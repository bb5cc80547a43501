"""Bits/byte: cacheless == chunked prefill through the dense cache == a hand computation."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.tiny import TINY, tiny_model

from efficient.cache import DenseKVCache
from efficient.data import ByteTokenizer, eval_windows
from efficient.eval import perplexity, select_windows
from efficient.models import LlamaModel, jit_forward

TOK = ByteTokenizer()
BYTE_MODEL = dict(vocab_size=259, eos_token_ids=(258,), pad_token_id=256)
DOCS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "print('héllo')\n"]


def _hand_nll(model: LlamaModel, tokens: np.ndarray, mask: np.ndarray) -> float:
    """Full cacheless forward per window, log-softmax in float64 with numpy."""
    step = jit_forward(model)
    total = 0.0
    for w in range(len(tokens)):
        logits, _ = step(jnp.asarray(tokens[w : w + 1, :-1]))
        logits = np.asarray(logits[0], np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -logp[np.arange(len(logp)), tokens[w, 1:]]
        total += float(nll[mask[w]].sum())
    return total


def test_uniform_model_gives_log2_vocab_bits_per_token() -> None:
    model = LlamaModel(TINY.replace(**BYTE_MODEL), rngs=nnx.Rngs(0))
    model.lm_head.kernel.set_value(jnp.zeros_like(model.lm_head.kernel.get_value()))  # logits 0: uniform
    windows = eval_windows(["ab", "c"], TOK, seq_len=4)  # stream EOS a b EOS c EOS: 5 targets, 3 bytes
    assert (windows.num_tokens, windows.num_bytes) == (5, 3)
    want = 5 * math.log2(259) / 3
    for cache in (None, DenseKVCache.for_model):
        result = perplexity(model, windows, cache=cache, chunk=3, batch_size=1)
        assert result.tokens == 5 and result.bytes == 3
        assert result.bits_per_byte == pytest.approx(want, rel=1e-6)
        assert result.perplexity == pytest.approx(259, rel=1e-5)


def test_cacheless_equals_chunked_dense_equals_hand_computation() -> None:
    model = tiny_model(**BYTE_MODEL)
    windows = eval_windows(DOCS, TOK, seq_len=24)  # 3 windows, the last one padded
    assert len(windows.tokens) == 3 and not windows.mask[-1].all()
    hand = _hand_nll(model, windows.tokens, windows.mask)
    cacheless = perplexity(model, windows, batch_size=2)  # 2 does not divide 3: a padded batch
    chunked = perplexity(model, windows, cache=DenseKVCache.for_model, chunk=10, batch_size=2)  # 10 !| 24
    assert cacheless.tokens == chunked.tokens == windows.num_tokens == int(windows.mask.sum())
    assert cacheless.bytes == windows.num_bytes == sum(len(d.encode()) for d in DOCS)
    assert cacheless.nll == pytest.approx(hand, rel=1e-5)
    assert chunked.nll == pytest.approx(hand, rel=1e-5)
    assert cacheless.bits_per_byte == pytest.approx(hand / math.log(2) / windows.num_bytes, rel=1e-5)


def test_a_lossy_cache_is_measured_through_its_chunks() -> None:
    """A bfloat16 cache changes the attended keys of later chunks only: chunk=seq_len
    (nothing read back from the cache) matches the float32 result, chunk=4 does not."""
    model = tiny_model(**BYTE_MODEL)
    windows = eval_windows(DOCS, TOK, seq_len=24)
    bf16 = lambda config, b, s: DenseKVCache.for_model(config, b, s, dtype=jnp.bfloat16)  # noqa: E731
    exact = perplexity(model, windows)
    one_chunk = perplexity(model, windows, cache=bf16, chunk=24)
    chunked = perplexity(model, windows, cache=bf16, chunk=4)
    assert one_chunk.nll != exact.nll  # the chunk attends to its own keys as stored (bf16) ...
    assert chunked.nll == pytest.approx(exact.nll, rel=1e-2)  # ... close, but measured


def test_select_windows_counts_the_bytes_of_the_subset() -> None:
    windows = eval_windows(DOCS, TOK, seq_len=8)
    subset = select_windows(windows, TOK, max_windows=3)
    assert len(subset.tokens) == 3
    targets = subset.tokens[:, 1:][subset.mask]
    assert subset.num_bytes == int((targets < 256).sum()) and subset.num_tokens == int(subset.mask.sum())
    assert select_windows(windows, TOK, max_windows=0) is windows
    with pytest.raises(ValueError, match="max_windows"):
        select_windows(windows, TOK, max_windows=-1)


def test_bad_arguments_raise_naming_them() -> None:
    model = tiny_model(**BYTE_MODEL)
    windows = eval_windows(DOCS, TOK, seq_len=8)
    with pytest.raises(ValueError, match="chunk"):
        perplexity(model, windows, cache=DenseKVCache.for_model, chunk=0)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, windows, batch_size=0)
    short = tiny_model(max_position_embeddings=16, **BYTE_MODEL)
    with pytest.raises(ValueError, match="max_position_embeddings 16"):
        perplexity(short, eval_windows(DOCS, TOK, seq_len=32))
