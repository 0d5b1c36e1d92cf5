"""Dataset specs and batches (gkq_jax.job.data)."""

import gzip
import pathlib
import struct
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from gkq_jax.job.data import images as data_lib


def test_digits_is_offline_and_deterministic():
  a, b = data_lib.load("digits"), data_lib.load("digits")
  assert a.train_x.shape == (1438, 8, 8, 1) and a.test_x.shape == (359, 8, 8, 1)
  np.testing.assert_array_equal(a.train_y, b.train_y)
  assert abs(float(a.train_x.mean())) < 1e-4


def write_idx(path, array):
  header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader(tmp_path):
  rng = np.random.default_rng(0)
  write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 28, 28)))
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(20) % 10)
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (5, 28, 28)))
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
  ds = data_lib.load(f"idx:{tmp_path}")
  assert ds.train_x.shape == (20, 28, 28, 1) and list(ds.test_y) == [0, 1, 2, 3, 4]
  (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(data_lib.DataError, match="no t10k-labels-idx1-ubyte"):
    data_lib.load(f"idx:{tmp_path}")


def test_fashion_mnist_from_shared(shared_datasets):
  ds = data_lib.load(f"idx:{shared_datasets / 'fashion-mnist'}")
  assert ds.train_x.shape == (60000, 28, 28, 1) and ds.test_x.shape == (10000, 28, 28, 1)
  assert ds.num_classes == 10


def make_folder(root: pathlib.Path, split_dirs=True, sizes=None):
  rng = np.random.default_rng(0)
  for split in (("train", "test") if split_dirs else ("",)):
    for cls in ("cat", "dog"):
      d = root / split / cls
      d.mkdir(parents=True)
      for i in range(3):
        size = (sizes or {}).get((split, cls, i), (6, 6))
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(d / f"{i}.png")


def test_folder_reader_split_dirs_archive_and_mixed_sizes(tmp_path, monkeypatch):
  monkeypatch.setenv("GKQ_DATA_DIR", str(tmp_path / "cache"))
  make_folder(tmp_path / "ds")
  ds = data_lib.load(f"folder:{tmp_path / 'ds'}")
  assert ds.train_x.shape == (6, 6, 6, 3) and ds.num_classes == 2
  with tarfile.open(tmp_path / "ds.tar.gz", "w:gz") as tar:
    tar.add(tmp_path / "ds", arcname="ds")
  from_tar = data_lib.load(f"folder:{tmp_path / 'ds.tar.gz'}")
  np.testing.assert_array_equal(from_tar.train_x, ds.train_x)
  make_folder(tmp_path / "flat", split_dirs=False, sizes={("", "dog", 1): (7, 6)})
  with pytest.raises(data_lib.DataError, match="mixed sizes"):
    data_lib.load(f"folder:{tmp_path / 'flat'}")


@pytest.mark.parametrize("spec,match", [
    ("mnist", "unknown dataset spec 'mnist'"),
    ("idx:/nonexistent/dir", "does not exist"),
    ("folder:/nonexistent/dir", "does not exist"),
    ("tfds:surely_not_a_dataset_name", "could not be read|needs tensorflow-datasets"),
])
def test_bad_dataset_specs(spec, match):
  with pytest.raises(data_lib.DataError, match=match):
    data_lib.load(spec)


def test_tfds_spec_without_tensorflow_datasets_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
  with pytest.raises(data_lib.DataError, match="pip install tensorflow-datasets"):
    data_lib.load("tfds:mnist")


def test_tfds_source_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  try:
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
      ds = data_lib.load("tfds:mnist")
  except (ImportError, data_lib.DataError) as e:
    # Where the mock does not take, tfds falls back to preparing the real data and
    # needs optional modules some installs lack; any other error is a failure.
    if not isinstance(e, ImportError) and "ModuleNotFoundError" not in str(e):
      raise
    pytest.skip(f"tfds mock_data unavailable here: {type(e).__name__}: {e}")
  assert ds.train_x.shape[1:] == (28, 28, 1) and ds.num_classes == 10


def test_batches_are_deterministic():
  ds = data_lib.load("digits")
  a = list(data_lib.train_batches(ds, 100, seed=3, epoch=2))
  b = list(data_lib.train_batches(ds, 100, seed=3, epoch=2))
  c = list(data_lib.train_batches(ds, 100, seed=3, epoch=3))
  assert len(a) == len(ds.train_x) // 100
  np.testing.assert_array_equal(a[0][0], b[0][0])
  assert not np.array_equal(a[0][0], c[0][0])
  assert a[0][0].shape == (100, 8, 8, 1)
  weights = np.concatenate([w for _, _, w in data_lib.eval_batches(ds.test_x, ds.test_y, 100)])
  assert weights.sum() == len(ds.test_x)


def test_validation_split_is_disjoint_stable_and_checked():
  ds = data_lib.load("digits")
  carved = data_lib.carve_validation(ds, 300, seed=3)
  again = data_lib.carve_validation(ds, 300, seed=3)
  other = data_lib.carve_validation(ds, 300, seed=4)
  assert len(carved.val_x) == 300 and len(carved.train_x) == len(ds.train_x) - 300
  np.testing.assert_array_equal(carved.val_x, again.val_x)
  assert not np.array_equal(carved.val_x, other.val_x)
  rows = lambda a: {r.tobytes() for r in a.reshape(len(a), -1)}
  assert not rows(carved.val_x) & rows(carved.train_x)  # digits has no duplicate images
  assert rows(carved.val_x) | rows(carved.train_x) == rows(ds.train_x)
  np.testing.assert_array_equal(carved.test_x, ds.test_x)  # the test set is untouched
  for bad in (0, -1, len(ds.train_x)):
    with pytest.raises(data_lib.DataError, match="validation_size"):
      data_lib.carve_validation(ds, bad, seed=0)
