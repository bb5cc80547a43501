"""Multi-host start-up: `jax.distributed`, from arguments, the environment or the cluster.

    # every process of the job, before any other jax call:
    from efficient.parallel import initialize_distributed
    initialize_distributed()          # TPU pod slice, SLURM, Open MPI: detected by jax
    initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=0)   # explicit
    # or EFFICIENT_COORDINATOR=10.0.0.1:1234 EFFICIENT_NUM_PROCESSES=2 EFFICIENT_PROCESS_ID=0

Afterwards `jax.devices()` lists every process's devices, `make_mesh` spans them, and the
same program (shard_model, generate, the training step) runs in every process
(multi-controller SPMD). On a TPU pod slice each host runs the script with no arguments;
on a multi-GPU node, one process per GPU (`local_device_ids=[i]`) or one per node. CPU
processes (tests, laptops) exchange collectives through gloo.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

_ENV = {"coordinator_address": "EFFICIENT_COORDINATOR", "num_processes": "EFFICIENT_NUM_PROCESSES",
        "process_id": "EFFICIENT_PROCESS_ID"}


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: Sequence[int] | None = None) -> None:
    """Join this process to a multi-process job (a no-op if already joined). Arguments left
    None are read from EFFICIENT_COORDINATOR / EFFICIENT_NUM_PROCESSES / EFFICIENT_PROCESS_ID,
    then left to jax's cluster detection. ValueError naming a malformed value."""
    if jax.distributed.is_initialized():
        return
    coordinator_address = coordinator_address or os.environ.get(_ENV["coordinator_address"]) or None
    values = {}
    for name, value in (("num_processes", num_processes), ("process_id", process_id)):
        if value is None and os.environ.get(_ENV[name]):
            try:
                value = int(os.environ[_ENV[name]])
            except ValueError as err:
                raise ValueError(f"{_ENV[name]} must be an int, got {os.environ[_ENV[name]]!r}") from err
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"initialize_distributed: {name} must be a non-negative int, got {value!r}")
        values[name] = value
    if values["num_processes"] is not None and values["process_id"] is not None and \
            values["process_id"] >= values["num_processes"]:
        raise ValueError(f"initialize_distributed: process_id {values['process_id']} must be below "
                         f"num_processes {values['num_processes']}")
    if coordinator_address is not None and ":" not in coordinator_address:
        raise ValueError(f"initialize_distributed: coordinator_address must be host:port, got {coordinator_address!r}")
    if os.environ.get("JAX_PLATFORMS", "") == "cpu" or jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, local_device_ids=local_device_ids,
                               **values)
