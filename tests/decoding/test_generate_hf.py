"""Greedy `generate` equals `transformers` greedy generate on random HF models."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers.hf_models import save_hf_model

from efficient.cache import HybridKVCache
from efficient.decoding import generate
from efficient.models import from_pretrained

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28]]


@pytest.mark.parametrize("family", ["llama3", "mistral_window", "qwen2_bias", "qwen3_qknorm"])
def test_greedy_generate_matches_transformers(tmp_path, family: str) -> None:  # noqa: ANN001
    hf = save_hf_model(family, tmp_path)
    ours = from_pretrained(tmp_path, dtype="float32")
    new = 16
    out = generate(ours, PROMPTS, max_new_tokens=new, stop_tokens=())
    for prompt, seq in zip(PROMPTS, out.sequences(), strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        assert seq == ref[0, len(prompt):].tolist()
    assert len({tuple(s) for s in out.sequences()}) == len(PROMPTS)


@pytest.mark.parametrize("family", ["mistral_window", "gemma3_7layer"])
def test_greedy_generate_on_the_hybrid_cache_matches_transformers(tmp_path, family: str) -> None:  # noqa: ANN001
    """Sliding-window layers in a ring of window + 1 entries (it wraps several times in 16 tokens)."""
    hf = save_hf_model(family, tmp_path)
    ours = from_pretrained(tmp_path, dtype="float32")
    new = 16
    out = generate(ours, PROMPTS, max_new_tokens=new, stop_tokens=(),
                   cache=functools.partial(HybridKVCache.for_model, max_step=2))
    for prompt, seq in zip(PROMPTS, out.sequences(), strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        assert seq == ref[0, len(prompt):].tolist()
