"""Every notebook is a valid jupytext percent notebook and runs top to bottom in smoke mode
(tiny settings, a tiny random model saved like a checkpoint)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import jupytext
import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


def test_the_notebooks_exist() -> None:
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "harness_tour"}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from efficient.data import ByteTokenizer
    from efficient.models import LlamaModel, ModelConfig, save_pretrained
    from flax import nnx

    tok = ByteTokenizer()
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(tok.eos_id,),
                         pad_token_id=tok.pad_id, max_position_embeddings=512)
    folder = tmp_path_factory.mktemp("nb") / "tiny"
    save_pretrained(LlamaModel(config, rngs=nnx.Rngs(0)), folder)
    return folder


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path: Path, tiny_path: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = jupytext.read(path)
    cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert len(cells) >= 3 and any(c.cell_type == "markdown" for c in notebook.cells)
    monkeypatch.setenv("EFFICIENT_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("MODEL_PATH", str(tiny_path))
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path))
    monkeypatch.chdir(ROOT)
    saved_path = list(sys.path)
    try:
        namespace = runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.path[:] = saved_path
        plt.close("all")
    if path.stem == "quickstart":
        assert set(namespace["results"]) == {"dense", "dense_bf16"}
        assert namespace["results"]["dense"]["agreement"] == 1.0
    if path.stem == "harness_tour":
        metrics = json.loads((namespace["run"] / "metrics.json").read_text())
        assert "dense_fp16" in {r["cache"] for r in metrics["rows"]}  # a variant registered in the notebook
        assert (namespace["run"] / "quickstart.png").exists() and namespace["run"].parent.parent == tmp_path
        from efficient import variants

        assert "dense_fp16" not in {c.name for c in variants.caches()}  # the notebook cleaned up
