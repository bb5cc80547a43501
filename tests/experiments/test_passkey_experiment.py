"""The passkey experiment runs end to end on a tiny random model through `experiments.run`,
and refuses a context length beyond the model's capacity naming config.contexts."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # experiments/ and configs/ are not installed packages


@pytest.fixture
def tiny_path(repo: None, tmp_path: Path) -> Path:
    from experiments.common import save_random_model

    return save_random_model(tmp_path / "m", size="tiny")


def _config(tiny_path: Path, tmp_path: Path, **changes: object) -> ml_collections.ConfigDict:
    from configs import passkey

    config = passkey.get_config("tiny")
    config.model.path, config.results_dir, config.run_name = str(tiny_path), str(tmp_path / "results"), "smoke"
    for key, value in changes.items():
        config[key] = value
    config.lock()
    return config


def test_passkey_end_to_end(tiny_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from experiments.run import run_experiment

    config = _config(tiny_path, tmp_path)
    out = run_experiment(config)
    assert out == tmp_path / "results" / "passkey" / "smoke"
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "config.json").read_text())["contexts"] == [64, 128]
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"

    contexts, depths = list(config.contexts), list(config.depths)
    assert len(metrics["records"]) == len(contexts) * len(depths) * config.samples
    assert [(r["context"], r["depth"]) for r in metrics["records"]] == [(n, d) for n in contexts for d in depths]
    for r in metrics["records"]:
        assert r["task"] == "passkey" and r["context_tokens"] <= r["context"] and len(r["answer"]) == 5
        assert 0 <= r["needle_token"] < r["context_tokens"] and 0.0 <= r["digits"] <= 1.0
    assert [(c["context"], c["depth"]) for c in metrics["cells"]] == [(n, d) for n in contexts for d in depths]
    summaries = [*metrics["cells"], *metrics["per_context"].values(), metrics["overall"]]
    for v in summaries:
        assert 0.0 <= v["exact_match"] <= 1.0 and 0.0 <= v["digit_accuracy"] <= 1.0
    assert set(metrics["per_context"]) == {"64", "128"} and metrics["overall"]["examples"] == 4
    assert set(metrics["target"]["met"]) == {"64", "128"}
    assert metrics["target"]["all_met"] == all(metrics["target"]["met"].values())
    assert metrics["capacity"] == 512 - config.max_new_tokens
    assert {"platform", "jax", "backend", "cpu_count"} <= set(metrics["machine"])
    printed = capsys.readouterr().out
    assert "exact@64" in printed and "target exact >= 0.90 at 128" in printed and "[passkey" in printed


def test_context_beyond_capacity_names_the_config_key(tiny_path: Path, tmp_path: Path) -> None:
    from experiments.run import run_experiment

    config = _config(tiny_path, tmp_path, contexts=(64, 512))  # tiny holds 512 positions - 8 new tokens
    with pytest.raises(ValueError, match=r"config.contexts: context lengths \[512\] exceed the model capacity 504"):
        run_experiment(config)
    assert not (tmp_path / "results" / "passkey").exists()

    config = _config(tiny_path, tmp_path, task="multikey", contexts=(40,))  # 4 needles + question: 72 tokens
    with pytest.raises(ValueError, match="config.contexts: cannot build a multikey prompt of 40 tokens"):
        run_experiment(config)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("task", "needle", "config.task: expected one of"),
    ("cache", "nope", "config.cache: caches: unknown cache"),
    ("depths", (0.5, 1.5), r"config.depths: expected values in \[0, 1\]"),
    ("samples", 0, "config.samples: expected a positive int"),
])
def test_bad_settings_name_the_config_key(repo: None, tmp_path: Path, key: str, value: object,
                                          message: str) -> None:
    from experiments.passkey import select_variants, settings_from

    with pytest.raises(ValueError, match=message):
        select_variants(settings_from(_config(tmp_path / "unused", tmp_path, **{key: value})))
