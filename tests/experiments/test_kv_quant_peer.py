"""`experiments.kv_quant_peer`: transformers' DynamicCache, fed chunk by chunk, gives our dense
cache's bits/byte on the same windows; its QuantizedCache (quanto) changes it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from efficient.cache import DenseKVCache  # noqa: E402
from efficient.data import EvalWindows  # noqa: E402
from efficient.eval import perplexity  # noqa: E402
from efficient.models import from_pretrained  # noqa: E402

SEQ_LEN, CHUNK = 48, 16  # 3 chunks: quantized at the first, kept in the residual, re-quantized at the third


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EvalWindows]:
    from helpers.hf_models import save_hf_model

    folder = tmp_path_factory.mktemp("llama3")
    save_hf_model("llama3", folder)  # vocab 97, GQA 4:2, head_dim 8, max positions 64
    tokens = np.random.default_rng(0).integers(3, 97, size=(3, SEQ_LEN + 1)).astype(np.int32)
    mask = np.ones((3, SEQ_LEN), bool)
    mask[-1, 30:] = False  # a padded last window, as eval_windows makes
    # any byte count: both sides divide by it
    return folder, EvalWindows(tokens=tokens, mask=mask, num_tokens=int(mask.sum()), num_bytes=321)


def test_dynamic_cache_control_matches_our_dense_cache(setup: tuple[Path, EvalWindows]) -> None:
    from experiments.kv_quant_peer import transformers_cache_bits_per_byte

    folder, windows = setup
    ours = perplexity(from_pretrained(folder, dtype="float32"), windows, cache=DenseKVCache.for_model,
                      chunk=CHUNK, batch_size=2)
    peer = transformers_cache_bits_per_byte(folder, windows, chunk=CHUNK, nbits=None, threads=1)
    assert (peer["tokens"], peer["bytes"]) == (ours.tokens, ours.bytes) == (int(windows.mask.sum()), 321)
    assert peer["settings"]["cache"] == "DynamicCache"
    assert peer["bits_per_byte"] == pytest.approx(ours.bits_per_byte, rel=1e-4)
    assert peer["bits_per_byte"] == pytest.approx(peer["nll"] / math.log(2) / 321)
    assert ours.nats_per_token > 1.0  # random weights scaled up: not a near-uniform trivial case

    pytest.importorskip("optimum.quanto")
    rows = {nbits: transformers_cache_bits_per_byte(folder, windows, chunk=CHUNK, nbits=nbits, group_size=8,
                                                    residual_length=32, threads=1) for nbits in (2, 4)}
    for nbits, row in rows.items():
        assert row["settings"]["cache"] == "QuantizedCache" and row["settings"]["layer"] == "QuantoQuantizedLayer"
        assert (row["settings"]["nbits"], row["settings"]["q_group_size"], row["settings"]["residual_length"],
                row["settings"]["axis_key"], row["settings"]["axis_value"]) == (nbits, 8, 32, 0, 0)
        assert row["tokens"] == ours.tokens and row["bytes"] == ours.bytes
        assert abs(row["bits_per_byte"] - peer["bits_per_byte"]) > 1e-4 * peer["bits_per_byte"]
    # 4 bits are closer to the float control than 2 bits
    assert abs(rows[4]["bits_per_byte"] - peer["bits_per_byte"]) < abs(rows[2]["bits_per_byte"] - peer["bits_per_byte"])
