"""The passkey experiment runs end to end (both prose tasks) on a tiny random model through
`experiments.run`, and refuses bad settings naming the config key."""

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
    assert json.loads((out / "config.json").read_text())["contexts"] == [320, 448]
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"

    tasks, contexts, depths = list(config.tasks), list(config.contexts), list(config.depths)
    assert tasks == ["classic_passkey", "kv_prose"] and metrics["tasks"] == tasks
    assert len(metrics["records"]) == len(tasks) * len(contexts) * len(depths) * config.samples
    assert [(r["task"], r["context"], r["depth"]) for r in metrics["records"]] == [
        (t, n, d) for t in tasks for n in contexts for d in depths]
    for r in metrics["records"]:
        assert r["context_tokens"] <= r["context"] and len(r["answer"]) == 5
        assert 0 <= r["needle_token"] < r["context_tokens"] and 0.0 <= r["digits"] <= 1.0
    assert set(metrics["results"]) == set(tasks)
    for result in metrics["results"].values():
        assert [(c["context"], c["depth"]) for c in result["cells"]] == [(n, d) for n in contexts for d in depths]
        for v in [*result["cells"], *result["per_context"].values(), result["overall"]]:
            assert 0.0 <= v["exact_match"] <= 1.0 and 0.0 <= v["digit_accuracy"] <= 1.0
        assert set(result["per_context"]) == {"320", "448"} and result["overall"]["examples"] == 4
        assert result["target"]["all_met"] == all(result["target"]["met"].values())
    assert metrics["all_met"] == all(v["target"]["all_met"] for v in metrics["results"].values())
    assert metrics["capacity"] == 512 - config.max_new_tokens and metrics["backend"] == "efficient"
    assert metrics["task_kwargs"] == {"classic_passkey": {}, "kv_prose": {"num_keys": 1, "style": "quiz"}}
    assert {"platform", "jax", "backend", "cpu_count"} <= set(metrics["machine"])
    printed = capsys.readouterr().out
    assert "== classic_passkey" in printed and "== kv_prose" in printed and "exact@320" in printed
    assert "target exact >= 0.90 at 448" in printed and "[passkey" in printed


def test_context_beyond_capacity_names_the_config_key(tiny_path: Path, tmp_path: Path) -> None:
    from experiments.run import run_experiment

    config = _config(tiny_path, tmp_path, contexts=(64, 512))  # tiny holds 512 positions - 8 new tokens
    with pytest.raises(ValueError, match=r"config.contexts: context lengths \[512\] exceed the model capacity 504"):
        run_experiment(config)
    assert not (tmp_path / "results" / "passkey").exists()

    config = _config(tiny_path, tmp_path, tasks=("multikey",), num_keys=4, contexts=(40,))  # 4 needles + question: 72
    with pytest.raises(ValueError, match="config.contexts: cannot build a multikey prompt of 40 tokens"):
        run_experiment(config)
    config = _config(tiny_path, tmp_path, tasks=("classic_passkey",), contexts=(100,))  # preamble alone: 150 bytes
    with pytest.raises(ValueError, match="config.contexts: cannot build a classic_passkey prompt of 100 tokens"):
        run_experiment(config)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("tasks", ("kv_prose", "needle"), "config.tasks: expected names from"),
    ("tasks", ("kv_prose", "kv_prose"), "config.tasks: values must be distinct"),
    ("num_keys", 101, r"config.num_keys: expected an int in \[0, 100\]"),
    ("cache", "nope", "config.cache: caches: unknown cache"),
    ("depths", (0.5, 1.5), r"config.depths: expected values in \[0, 1\]"),
    ("samples", 0, "config.samples: expected a positive int"),
    ("kv_style", "loud", "config.kv_style: expected one of"),
])
def test_bad_settings_name_the_config_key(repo: None, tmp_path: Path, key: str, value: object,
                                          message: str) -> None:
    from experiments.passkey import select_variants, settings_from

    with pytest.raises(ValueError, match=message):
        select_variants(settings_from(_config(tmp_path / "unused", tmp_path, **{key: value})))


def test_samples_per_context_length(repo: None) -> None:
    from configs import passkey
    from experiments.passkey import settings_from

    config = passkey.get_config()
    assert config.model.path == "smollm2" and config.contexts == (1024, 2048, 4096, 8184)
    assert settings_from(config).samples == (2, 2, 2, 1)
    config.samples = (1, 2, 3)
    with pytest.raises(ValueError, match=r"config.samples: expected a positive int or one per context length \(4\)"):
        settings_from(config)
