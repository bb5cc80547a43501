"""The parallel tests need the 8 simulated CPU devices the session sets up (tests/conftest.py)."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _eight_devices() -> None:
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by tests/conftest.py)")
