import gc
import os
import pathlib

import numpy as np
import pytest

# Tests always run on the host CPU unless told otherwise, so results do not
# depend on which accelerator a machine happens to have.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# XLA's CPU back end at LLVM -O1 instead of its default -O3: the tests check
# results, not speed, and most of their time is compiling. Twenty training steps
# of the MLP and of ResNetTiny and their 8-value codebooks came out bit for bit
# the same at both levels, in 23 s instead of 33 s. A level set by the caller in
# XLA_FLAGS wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=1").strip()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  # Every jitted closure a test builds stays compiled in JAX's caches, and each
  # XLA CPU executable holds a few memory mappings of its own. One process
  # running the whole suite passed the kernel's 65,530-mapping limit
  # (vm.max_map_count) and XLA segfaulted in a later compile. Clearing the
  # caches after each module kept the suite's peak at 12,447 (in
  # test_kmeans1d).
  yield
  import jax
  jax.clear_caches()
  gc.collect()


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
