import os
import pathlib

import numpy as np
import pytest

# Tests always run on the host CPU unless told otherwise, so results do not
# depend on which accelerator a machine happens to have.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture
def shared_datasets():
  if not SHARED.exists():
    pytest.skip(f"needs the shared datasets at {SHARED} (not present on this machine)")
  return SHARED


def pytest_collection_modifyitems(items):
  # `pytest -m "not job"` runs the library's tests alone, in seconds.
  for item in items:
    if "tests/job/" in str(item.fspath).replace("\\", "/"):
      item.add_marker(pytest.mark.job)


@pytest.fixture
def bell():
  """3,000 standard normal values with random squared-uniform importance."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal(3000).astype(np.float32)
  h = (rng.random(3000) ** 2).astype(np.float32)
  return x, h
