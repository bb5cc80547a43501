"""Session-wide test settings: a persistent JAX compilation cache, unoptimised XLA:CPU
code (compiling dominates small tests) and a polite torch.

The compilation cache lives in the project's ignored `.cache/jax` folder (override
with EFFICIENT_JAX_CACHE_DIR): identical computations compiled by different tests or
by the two xdist workers are compiled once, and a second run reuses everything.
torch's OpenMP threads spin-wait by default, which made it about 10x slower on a
shared 2-core machine: PASSIVE makes them sleep.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Tests run small shapes, so XLA's compile time dominates their run time: compiling
# without LLVM's backend optimisations (the same programs, less optimised machine code)
# took the speculative-decoding and hybrid-cache tests from 158 s to 121 s. Benchmarks
# and experiments run outside pytest keep the default level. Subprocesses inherit it.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
# XLA:CPU's MLIR fusion emitters compile more slowly than its classic LLVM IR emitters:
# without them four speculative-decoding tests took 18-22 s cold instead of 26-29 s, and
# the whole suite with an empty compilation cache 350 s instead of 610 s (-n 2, 2 cores).
# The flag is probed first: an XLA that no longer knows it would abort at start-up.
_CLASSIC_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    probe = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


def _add_xla_flag(flag: str) -> None:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    _add_xla_flag(_FAST_COMPILE)
# The sharding tests (tests/parallel) run on 8 simulated CPU devices. Everything else runs
# on device 0 as before: an unsharded computation never touches the other seven.
_DEVICES = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    _add_xla_flag(_DEVICES)
# The xdist workers inherit the controller's XLA_FLAGS, so only the controller probes.
if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"] and _xla_accepts(_CLASSIC_EMITTERS):
    _add_xla_flag(_CLASSIC_EMITTERS)

import jax  # noqa: E402

_CACHE_DIR = Path(os.environ.get("EFFICIENT_JAX_CACHE_DIR", Path(__file__).resolve().parents[1] / ".cache" / "jax"))
_CACHE_DIR.mkdir(parents=True, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(_CACHE_DIR))
# Subprocesses (the experiment scripts' end-to-end tests) share the same cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE_DIR))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


import gc  # noqa: E402

import pytest  # noqa: E402


# Linux allows 65,530 memory mappings per process; the most one test module added in a
# logged run was 17,600 (the registry tests), so 40,000 leaves room for one more module.
_MAPPINGS_BEFORE_RELEASE = 40_000


def _memory_mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux: no such limit to watch
        return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs(request: pytest.FixtureRequest):  # noqa: ANN202
    """Drop every compiled program after a test module once the process holds many memory
    mappings. Each XLA:CPU executable keeps about 6; an xdist worker that ran most of the
    suite held over 10,000 executables, past Linux's 65,530 mappings per process, and
    segfaulted inside a later compile (seen three times near the end of the suite, in
    different tests). Released only past 40,000: every small program (each eager
    op) compiles again after a release, and only those over 0.2 s come back from the
    persistent compilation cache."""
    yield
    mappings = _memory_mappings()
    released = mappings > _MAPPINGS_BEFORE_RELEASE
    if released:
        jax.clear_caches()
        gc.collect()
    if log := os.environ.get("EFFICIENT_TEST_MAPPINGS_LOG"):  # diagnostics: mappings per module
        import time

        with open(log, "a") as out:
            out.write(f"{os.getpid()} {time.time():.1f} {mappings} {int(released)} {request.module.__name__}\n")
