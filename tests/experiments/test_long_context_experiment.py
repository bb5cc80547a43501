"""The long-context experiment scores the same tail at every context length, on single
files (never a concatenation), end to end on a tiny random byte-level model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from configs import long_context as long_context_config
from efficient.data import ByteTokenizer, Document
from experiments.common import save_random_model
from experiments.long_context import context_windows, long_files, settings_from
from experiments.run import run_experiment


def test_windows_score_the_same_tail_of_one_file() -> None:
    tok = ByteTokenizer()
    docs = [Document(path="a.py", module="a", text="x = 1\n" * 20), Document(path="b.py", module="b", text="y\n"),
            Document(path="c.py", module="c", text="def f():\n    return 2\n" * 10)]
    files = long_files(docs, tok, 40, count=5)
    assert [p for p, _ in files] == ["c.py", "a.py"]  # longest first; b.py is too short
    short, long = context_windows(files, 8, 4, tok), context_windows(files, 32, 4, tok)
    assert short.tokens.shape == (2, 9) and long.tokens.shape == (2, 33)
    np.testing.assert_array_equal(short.tokens[:, -5:], long.tokens[:, -5:])  # same scored tail
    assert short.num_tokens == long.num_tokens == 8 and short.num_bytes == long.num_bytes == 8
    assert short.mask[:, -4:].all() and not short.mask[:, :-4].any()


def test_long_context_end_to_end(tmp_path: Path) -> None:
    model = save_random_model(tmp_path / "model", size="tiny")
    config = long_context_config.get_config("tiny")
    config.model.path, config.results_dir, config.run_name = str(model), str(tmp_path), "smoke"
    out = run_experiment(config)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["context"] for r in metrics["rows"]] == list(config.contexts)
    assert all(r["tokens"] == config.files * config.tail for r in metrics["rows"])
    assert all(np.isfinite(r["bits_per_byte"]) and r["bits_per_byte"] > 0 for r in metrics["rows"])
    assert (out / "bits_per_byte.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("key", "value", "match"), [("contexts", (32, 16), "increasing"),
                                                     ("contexts", (8, 32), ">= config.tail"),
                                                     ("tail", 0, "tail")])
def test_bad_settings_name_their_key(key: str, value: object, match: str) -> None:
    config = long_context_config.get_config("tiny")
    config[key] = value
    with pytest.raises(ValueError, match=match):
        settings_from(config)
