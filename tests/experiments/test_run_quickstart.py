"""`python -m experiments.run` runs the quickstart end to end on a tiny saved random model;
bad input (unknown key, missing model, vocabulary mismatch, empty corpus, too long a
task context, unknown experiment) fails with an error naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.tiny import tiny_model

from efficient.models import save_pretrained

ROOT = Path(__file__).resolve().parents[2]
DECODERS = ("greedy", "spec_prompt_lookup")
CACHES = ("dense", "kivi2")  # a lossless and a lossy one; the registry tests run every cache


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(ROOT))  # experiments/ and configs/ are not installed packages
    from experiments.common import save_random_model

    return save_random_model(tmp_path_factory.mktemp("tiny") / "model", size="tiny")


@pytest.fixture
def repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_quickstart_end_to_end(tiny_path: Path, tmp_path: Path) -> None:
    done = _cli("--config=configs/quickstart.py:tiny", f"--config.model.path={tiny_path}",
                "--config.draft.path=checkpoints/draft", "--config.variants.pairs=each",
                # a plain and a speculative decoder; the registry tests run every decoder
                # (sampled, draft model, ...) through the same harness protocol
                f"--config.variants.decoders={','.join(DECODERS)}", f"--config.variants.caches={','.join(CACHES)}",
                f"--config.results_dir={tmp_path}", "--config.run_name=smoke")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "quickstart" / "smoke"
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["path"] == str(tiny_path) and config["experiment"] == "quickstart"
    assert (run / "quickstart.png").read_bytes()[:4] == b"\x89PNG"
    # pairs=each: every decoder on the dense cache and every cache under greedy decoding.
    pairs = {(r["decoder"], r["cache"]) for r in metrics["rows"]}
    assert pairs == ({(name, "dense") for name in DECODERS}
                     | {("greedy", name) for name in CACHES})
    for row in metrics["rows"]:
        assert {"bits_per_byte", "agreement", "retrieval_exact", "retrieval_digits", "ttft_ms",
                "decode_tokens_per_s", "cache_bytes", "cache_bytes_per_token", "lossless"} <= set(row)
        assert row["decode_tokens_per_s"] > 0 and row["cache_bytes"] > 0 and 0 <= row["agreement"] <= 1
    greedy_dense = next(r for r in metrics["rows"] if (r["decoder"], r["cache"]) == ("greedy", "dense"))
    assert greedy_dense["agreement"] == 1.0 and metrics["reference_pair"] == ["greedy", "dense"]
    dense, cacheless = metrics["caches"]["dense"]["quality"], metrics["cacheless"]
    assert dense["bits_per_byte"] == pytest.approx(cacheless["bits_per_byte"], rel=1e-5)
    assert set(metrics["caches"]) == set(CACHES)
    assert "bits/byte" in done.stdout and "decode tok/s" in done.stdout


def test_unknown_config_key_is_refused(tiny_path: Path, tmp_path: Path) -> None:
    done = _cli("--config=configs/quickstart.py:tiny", f"--config.model.path={tiny_path}",
                f"--config.results_dir={tmp_path}", "--config.generation.max_new_tokenz=4")
    assert done.returncode != 0
    assert "max_new_tokenz" in done.stderr
    assert not (tmp_path / "quickstart").exists()


def _config(tiny_path: Path, tmp_path: Path, **changes: object):  # noqa: ANN202
    from configs import quickstart

    config = quickstart.get_config("tiny")
    config.model.path, config.results_dir = str(tiny_path), str(tmp_path)
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    config.lock()
    return config


def test_missing_model_path_names_it(repo: None, tiny_path: Path, tmp_path: Path) -> None:
    from experiments.run import run_experiment

    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=f"config.model.path: checkpoint folder '{missing}' does not"):
        run_experiment(_config(missing, tmp_path))


def test_a_task_context_beyond_the_model_capacity_is_refused(repo: None, tiny_path: Path,
                                                             tmp_path: Path) -> None:
    from experiments.run import run_experiment

    config = _config(tiny_path, tmp_path, retrieval__context_tokens=600)  # the tiny model holds 512
    with pytest.raises(ValueError, match="context_tokens: 600 exceeds the model capacity 504"):
        run_experiment(config)


def test_tokenizer_larger_than_the_model_vocabulary(repo: None, tmp_path: Path) -> None:
    from experiments.common import load_tokenizer_for

    save_pretrained(tiny_model(), tmp_path / "v61")  # vocab 61 < 259 byte ids
    with pytest.raises(ValueError, match=r"ByteTokenizer\(\) has 259 ids but the model at .* has vocab_size 61"):
        load_tokenizer_for(tmp_path / "v61", "auto", 61)


def test_corpus_folder_errors(repo: None, tmp_path: Path) -> None:
    from experiments.common import load_documents

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files in folder"):
        load_documents(str(tmp_path / "empty"), None, "all")
    with pytest.raises(FileNotFoundError, match="config.data.source"):
        load_documents(str(tmp_path / "absent"), None, "all")


def test_unknown_experiment(repo: None) -> None:
    from experiments.run import experiment_fn

    with pytest.raises(ValueError, match=r"unknown experiment 'nope'; available: \[.*'quickstart'"):
        experiment_fn("nope")
