"""Test setup: 8 forced CPU devices (sharded == unsharded checks) and the shared data folder."""
import os
import pathlib

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """Path to ../shared/data; skips the test when the folder is not beside the checkout."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"{SHARED_DATA} not found (real-data tests need ../shared beside the repo)")
  return SHARED_DATA
