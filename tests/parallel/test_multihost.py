"""Two processes on loopback, each with 4 CPU devices, run one sharded generate over all 8
(jax.distributed, gloo collectives) and agree with a single process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx
from helpers.sharded import CONFIG, PROMPTS

from efficient.decoding import generate
from efficient.models import LlamaModel
from efficient.parallel import initialize_distributed

TESTS = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    outs = [tmp_path / f"process{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(TESTS / "helpers" / "multihost_worker.py"), address, "2", str(i), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, out in enumerate(outs)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads(out.read_text()) for out in outs]
    assert [(r["devices"], r["local"]) for r in results] == [(8, 4), (8, 4)]
    expected = generate(LlamaModel(CONFIG, rngs=nnx.Rngs(0)), PROMPTS, max_new_tokens=8).sequences()
    assert results[0]["tokens"] == results[1]["tokens"] == expected


def test_bad_distributed_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="process_id 2 must be below num_processes 2"):
        initialize_distributed("127.0.0.1:1", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="coordinator_address must be host:port"):
        initialize_distributed("localhost", num_processes=2, process_id=0)
    monkeypatch.setenv("EFFICIENT_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="EFFICIENT_NUM_PROCESSES must be an int"):
        initialize_distributed("127.0.0.1:1", process_id=0)
