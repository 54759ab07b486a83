"""Test setup: 8 fake CPU devices (set before JAX initialises) and small, fast compiles."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
# Tests are compile-bound: skip most XLA optimisation passes (results are unchanged).
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def smoke_config():
    from configs import smoke

    return smoke.get_config()
