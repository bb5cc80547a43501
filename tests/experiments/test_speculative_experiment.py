"""The speculative benchmark runs end to end on tiny random target and draft models:
files are written, every lossless greedy decoder reproduces greedy decoding, and
there is a row per task x batch x decoder; bad settings name their config key."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import pytest

from configs import speculative as speculative_config
from efficient import variants
from experiments.common import save_random_model
from experiments.run import run_experiment
from experiments.speculative import BASELINES, select_decoders, settings_from

RESOURCES = {"draft_model", "calibration_tokens"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("spec_models")
    return (save_random_model(root / "target", size="tiny", seed=0),
            save_random_model(root / "draft", size="tiny", seed=1))


def _one_per_resource() -> list[str]:
    """The first registered decoder for each distinct `needs` the harness serves (compiling
    every drafter twice would take minutes on a slow CPU)."""
    seen, names = set(), []
    for d in variants.decoders():
        if d.name not in BASELINES and d.needs not in seen and set(d.needs) <= RESOURCES:
            seen.add(d.needs)
            names.append(d.name)
    return names


def _config(models: tuple[Path, Path], results: Path) -> ml_collections.ConfigDict:
    config = speculative_config.get_config("tiny")
    config.model.path, config.draft.path = str(models[0]), str(models[1])
    config.results_dir, config.run_name = str(results), "smoke"
    return config


def test_speculative_end_to_end(models: tuple[Path, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(models, tmp_path)
    config.decoders = ",".join(_one_per_resource())
    config.model.layer_loop = "unrolled"  # per-layer weights and cache buffers under every drafter
    config.lock()
    out = run_experiment(config)
    assert out == tmp_path / "speculative" / "smoke"
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "config.json").read_text())["draft"]["path"] == str(models[1])
    assert metrics["model"]["layer_loop"] == "unrolled"
    for name in ("speedup", "mean_accepted"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert not metrics["skipped"], metrics["skipped"]
    names = ["greedy", *_one_per_resource()]
    keys = {(r["task"], r["batch_size"], r["decoder"]) for r in metrics["rows"]}
    assert keys == {(t, b, n) for t in config.tasks.kinds for b in config.generation.batch_sizes for n in names}
    assert len(metrics["rows"]) == len(keys)
    for row in metrics["rows"]:
        assert row["error"] is None, row
        assert row["e2e_seconds"] > 0 and row["speedup"] > 0 and row["target_forwards"] > 0
        assert row["generated_tokens"] == row["prompts"] * config.generation.max_new_tokens
        if row["expect_identical"]:
            assert row["identical"] and row["agreement"] == 1.0, row
        if row["decoder"] == "greedy":
            assert row["speedup"] == 1.0 and row["mean_accepted_tokens"] is None
        else:
            assert row["mean_accepted_tokens"] >= 1.0 and row["acceptance_by_depth"]
    assert metrics["machine"]["cpu_count"] and metrics["machine"]["jax"]
    assert set(metrics["prompts"]) == set(config.tasks.kinds)
    printed = capsys.readouterr().out
    assert "speedup" in printed and "accepted" in printed and "[speculative" in printed


def test_bad_settings_name_their_key(models: tuple[Path, Path], tmp_path: Path) -> None:
    config = _config(models, tmp_path)
    config.generation.batch_sizes = (3,)
    with pytest.raises(ValueError, match="batch_sizes"):
        settings_from(config)
    config = _config(models, tmp_path)
    config.tasks.kinds = ("completion", "poetry")
    with pytest.raises(ValueError, match="config.tasks.kinds"):
        settings_from(config)
    with pytest.raises(ValueError, match="config.decoders"):
        select_decoders("greedy,no_such_decoder")
    assert [d.name for d in select_decoders("greedy,spec_draft")] == ["spec_draft"]
    from experiments.common import load_model

    with pytest.raises(ValueError, match=r"config.model.layer_loop must be one of .*got 'unroll'"):
        load_model(models[0], layer_loop="unroll")


def test_missing_draft_is_skipped_with_reason(models: tuple[Path, Path], tmp_path: Path) -> None:
    config = _config(models, tmp_path)
    config.draft.path = str(tmp_path / "no_draft")
    config.decoders = "spec_draft"
    config.tasks.kinds = ("completion",)
    config.generation.batch_sizes = (2,)
    out = run_experiment(config)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "config.draft.path" in metrics["skipped"]["spec_draft"]
    assert {r["decoder"] for r in metrics["rows"]} == {"greedy"}


def test_transformers_prompt_lookup_peer_runs_on_the_same_prompts(tmp_path: Path) -> None:
    """The peer times transformers' greedy and prompt-lookup generate on the same weights and
    prompts, and reports whether its output equals its own greedy and ours."""
    pytest.importorskip("transformers")
    import numpy as np
    from helpers.hf_models import FAMILIES, save_hf_model

    from efficient.data.code_tasks import CodePrompt
    from efficient.decoding import generate
    from efficient.models import from_pretrained
    from experiments.speculative_peer import prompt_lookup_peer

    family = next(name for name, spec in FAMILIES.items()
                  if spec["model_type"] == "llama" and spec.get("max_position_embeddings", 64) >= 64)
    save_hf_model(family, tmp_path)
    rng = np.random.default_rng(0)
    pattern = rng.integers(3, 97, size=6).tolist()
    prompts = {"repetitive": [CodePrompt(kind="repetitive", ids=pattern * 3, text="", path="p", line=1),
                              CodePrompt(kind="repetitive", ids=rng.integers(3, 97, size=12).tolist(), text="",
                                         path="q", line=1)]}
    ours = generate(from_pretrained(tmp_path), [p.ids for p in prompts["repetitive"]], max_new_tokens=8,
                    stop_tokens=()).sequences()
    rows = prompt_lookup_peer(tmp_path, "float32", prompts, max_new_tokens=8, num_tokens=3, repeats=1, warmup=0,
                              threads=1, ours_greedy={"repetitive": ours}, log=lambda message: None)
    (row,) = rows
    assert row["task"] == "repetitive" and row["prompts"] == 2 and row["num_tokens"] == 3
    assert row["greedy_seconds"] > 0 and row["lookup_seconds"] > 0
    assert row["speedup"] == pytest.approx(row["greedy_seconds"] / row["lookup_seconds"])
    assert row["identical_to_own_greedy"] is True
    assert row["greedy_identical_to_ours"] is True and row["greedy_agreement_with_ours"] == 1.0
