"""One process of the two-process loopback test (tests/parallel/test_multihost.py): joins the job, shards
the tiny model over both processes' CPU devices, generates greedily, writes the tokens."""

from __future__ import annotations

import json
import sys

from efficient.parallel import initialize_distributed

address, num_processes, process_id, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
initialize_distributed(address, num_processes=num_processes, process_id=process_id)

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from efficient.decoding import generate  # noqa: E402
from efficient.models import LlamaModel  # noqa: E402
from efficient.parallel import make_mesh, shard_model  # noqa: E402
from helpers.sharded import CONFIG, PROMPTS  # noqa: E402

model = shard_model(LlamaModel(CONFIG, rngs=nnx.Rngs(0)), make_mesh(data=2, model=len(jax.devices()) // 2))
out = generate(model, PROMPTS, max_new_tokens=8)
with open(out_path, "w") as f:
    json.dump({"devices": len(jax.devices()), "local": len(jax.local_devices()), "tokens": out.sequences()}, f)
