import os
import pathlib

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
