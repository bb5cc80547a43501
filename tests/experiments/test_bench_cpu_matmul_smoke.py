"""The matmul benchmark runs on tiny shapes with its peer and reads the dot's dtype from HLO."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs import bench_cpu_matmul as matmul_config
from experiments.bench_cpu_matmul import dot_dtype_in_hlo, run


def test_bench_cpu_matmul_tiny(tmp_path: Path) -> None:
    config = matmul_config.get_config("tiny")
    metrics = run(config)
    assert [(r["dtype"], r["m"]) for r in metrics["rows"]] == [("float32", 16), ("bfloat16", 16)]
    for row in metrics["rows"]:
        assert row["jax_ms"] > 0 and row["torch_ms"] > 0
        assert row["xla_dot_dtype"] in ("f32", "bf16")
    assert metrics["rows"][0]["xla_dot_dtype"] == "f32"


def test_dot_dtype_is_read_from_the_instruction() -> None:
    hlo = "%convert = f32[4,8]{1,0} convert(%p)\n  %dot.1 = bf16[4,6]{1,0} dot(%a, %b), lhs_contracting_dims={1}"
    assert dot_dtype_in_hlo(hlo) == "bf16"
    with pytest.raises(ValueError, match="no dot"):
        dot_dtype_in_hlo("%add = f32[2]{0} add(%a, %b)")


def test_bad_settings_are_refused_with_their_key() -> None:
    config = matmul_config.get_config("tiny")
    config.dtypes = ("float16",)
    with pytest.raises(ValueError, match="config.dtypes"):
        run(config)
    config = matmul_config.get_config("tiny")
    config.peer = "llama.cpp"
    with pytest.raises(ValueError, match="config.peer"):
        run(config)
