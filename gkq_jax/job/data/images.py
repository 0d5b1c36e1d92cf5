"""Datasets from a config string, as numpy arrays, and batches for training.

Specs:
  * ``digits``: scikit-learn's bundled 8x8 handwritten digits (offline default),
    split 80/20 with a fixed permutation.
  * ``tfds:<name>``: a prepared TFDS dataset, read with ``tfds.data_source``.
  * ``idx:<dir>``: MNIST-format IDX files (MNIST, Fashion-MNIST).
  * ``folder:<dir or .tar.gz>``: one sub-folder per class of image files; with
    ``train/`` and ``test/`` sub-folders (the CIFAR-10 archive) they are the
    split, otherwise a fixed 80/20 split. Archives are unpacked once into
    ``$GKQ_DATA_DIR`` (default ``~/.cache/gkq_jax``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pathlib
import struct
import tarfile
from typing import Iterator

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class DataError(ValueError):
  """A dataset spec that cannot be read; the message says how to fix it."""


@dataclasses.dataclass
class Dataset:
  """A dataset held in host memory. The training loop reads any object with
  this interface (``num_train``, ``sample_shape``, ``train_batches``,
  ``test_batches``), so a streaming source can stand in for it."""

  train_x: np.ndarray  # (N, H, W, C) float32, normalised
  train_y: np.ndarray  # (N,) int32
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  name: str
  # Carved from the training set by carve_validation(); None when there is none.
  val_x: np.ndarray | None = None
  val_y: np.ndarray | None = None

  @property
  def num_train(self) -> int:
    return len(self.train_x)

  @property
  def sample_shape(self) -> tuple[int, ...]:
    return tuple(self.train_x.shape[1:])

  def train_batches(self, batch_size: int, seed: int, epoch: int, resume: dict | None = None):
    """This host's part of epoch ``epoch``'s global batches; ``resume`` (a
    position saved by the training loop) continues an interrupted epoch."""
    return train_batches(self, batch_size, seed, epoch, resume["batches"] if resume else 0)

  def test_batches(self, batch_size: int):
    return eval_batches(self.test_x, self.test_y, batch_size)

  @property
  def has_validation(self) -> bool:
    return self.val_x is not None

  def validation_batches(self, batch_size: int):
    return eval_batches(self.val_x, self.val_y, batch_size)


def carve_validation(ds: Dataset, size: int, seed: int) -> Dataset:
  """``ds`` with ``size`` training examples, drawn by ``seed``, moved to a
  validation split: schedules and hyperparameters are chosen on it, so the
  test set is only reported. The same (size, seed) always gives the same split."""
  n = len(ds.train_x)
  if not 0 < size < n:
    raise DataError(f"validation_size={size} must be between 1 and {n - 1} (the training set "
                    f"of {ds.name} has {n} examples); set --config.validation_size=0 for no "
                    "validation split.")
  order = np.random.default_rng([seed, 0x5A11]).permutation(n)
  val, train = np.sort(order[:size]), np.sort(order[size:])
  return dataclasses.replace(ds, train_x=ds.train_x[train], train_y=ds.train_y[train],
                             val_x=ds.train_x[val], val_y=ds.train_y[val])


def _normalise(train, test):
  """uint8 or float images -> float32 standardised with the train statistics."""
  train = train.astype(np.float32)
  test = test.astype(np.float32)
  mean = train.mean(axis=(0, 1, 2), keepdims=True)
  std = train.std(axis=(0, 1, 2), keepdims=True) + 1e-6
  return (train - mean) / std, (test - mean) / std


def _split(x, y, seed=0, test_fraction=0.2):
  order = np.random.default_rng(seed).permutation(len(x))
  n_test = int(round(len(x) * test_fraction))
  return x[order[n_test:]], y[order[n_test:]], x[order[:n_test]], y[order[:n_test]]


def _digits():
  from sklearn.datasets import load_digits
  d = load_digits()
  x = d.images.astype(np.float32)[..., None] / 16.0
  return _split(x, d.target.astype(np.int32)), 10


def _read_idx(path: pathlib.Path) -> np.ndarray:
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[:2] != b"\x00\x00":
    raise DataError(f"{path} is not an IDX file (bad magic number).")
  ndim = data[3]
  dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(dims)):
    raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, "
                    f"found {array.size}.")
  return array.reshape(dims)


def _idx(directory: str):
  root = pathlib.Path(directory)
  if not root.is_dir():
    raise DataError(f"idx: directory {root} does not exist (Debian's "
                    "dataset-fashion-mnist installs /usr/share/datasets/fashion-mnist).")

  def find(stem):
    for name in (stem, stem + ".gz"):
      if (root / name).exists():
        return root / name
    raise DataError(f"idx: {root} has no {stem}[.gz]; expected the four MNIST-format files "
                    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                    "t10k-labels-idx1-ubyte.")

  arrays = [_read_idx(find(s)) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
  tx, ty, vx, vy = arrays
  return (tx[..., None], ty.astype(np.int32), vx[..., None], vy.astype(np.int32)), 10


def _unpack(archive: pathlib.Path) -> pathlib.Path:
  cache = pathlib.Path(os.environ.get("GKQ_DATA_DIR", pathlib.Path.home() / ".cache" / "gkq_jax"))
  stat = archive.stat()
  identity = f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
  tag = hashlib.sha1(identity.encode()).hexdigest()[:12]
  target = cache / f"{archive.name.split('.')[0]}-{tag}"
  if not (target / ".complete").exists():
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
      tar.extractall(target, filter="data")
    (target / ".complete").touch()
  # An archive holding one top folder: use that folder.
  entries = [p for p in target.iterdir() if not p.name.startswith(".")]
  return entries[0] if len(entries) == 1 and entries[0].is_dir() else target


def class_files(root: pathlib.Path, classes=None) -> tuple[list[tuple[str, int]], list[str]]:
  """((path, label) of every image under <root>/<class>/, class names)."""
  classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
  if not classes:
    raise DataError(f"folder: {root} has no class sub-folders (expected <root>/<class>/<image>).")
  files = []
  for label, name in enumerate(classes):
    if (root / name).is_dir():
      files += [(str(p), label) for p in sorted((root / name).iterdir())
                if p.suffix.lower() in IMAGE_SUFFIXES]
  if not files:
    raise DataError(f"folder: no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}.")
  return files, classes


def read_image(path: str, image_size: int = 0) -> np.ndarray:
  """uint8 (H, W, C) pixels of an image file, resized when ``image_size`` is set;
  an unreadable or truncated file raises a DataError naming it."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      im.load()
      im = im.convert("RGB") if im.mode not in ("L", "RGB") else im
      if image_size and im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.BILINEAR)
      a = np.asarray(im)
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"folder: cannot read image {path} ({e}); remove or replace the "
                    "file.") from None
  return a[..., None] if a.ndim == 2 else a


def _read_class_folders(root: pathlib.Path, classes=None):
  files, classes = class_files(root, classes)
  images, shape, first = [], None, None
  for path, _ in files:
    a = read_image(path)
    if shape is None:
      shape, first = a.shape, path
    elif a.shape != shape:
      raise DataError(f"folder: images of mixed sizes: {first} is {shape}, {path} is "
                      f"{a.shape}; resize them to one size first.")
    images.append(a)
  return np.stack(images), np.asarray([label for _, label in files], np.int32), classes


def resolve_folder(spec: str) -> pathlib.Path:
  """The folder a ``folder:`` spec names; a .tar(.gz) archive is unpacked once."""
  path = pathlib.Path(spec)
  if not path.exists():
    raise DataError(f"folder: {path} does not exist.")
  if path.is_file():
    if not tarfile.is_tarfile(path):
      raise DataError(f"folder: {path} is a file but not a tar archive.")
    path = _unpack(path)
  return path


def _folder(spec: str):
  path = resolve_folder(spec)
  if (path / "train").is_dir() and (path / "test").is_dir():
    tx, ty, classes = _read_class_folders(path / "train")
    vx, vy, _ = _read_class_folders(path / "test", classes)
    return (tx, ty, vx, vy), len(classes)
  x, y, classes = _read_class_folders(path)
  return _split(x, y), len(classes)


def import_tfds(name: str):
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DataError(f"tfds:{name} needs tensorflow-datasets, which cannot be imported here "
                    f"({e}); pip install tensorflow-datasets, or use an idx: or folder: "
                    "dataset spec.") from None
  return tfds


def open_tfds(tfds, name: str):
  """(builder, {"train": source, "test": source}) of a prepared TFDS dataset."""
  try:
    builder = tfds.builder(name)
    sources = {s: tfds.data_source(name, split=s) for s in ("train", "test")}
  except Exception as e:  # tfds raises many types for missing / unknown data
    raise DataError(
        f"tfds:{name} could not be read ({type(e).__name__}: {str(e).splitlines()[0][:160]}). "
        f"Prepare it once on a machine with internet (pip install tensorflow && tfds build "
        f"{name}; data goes to ~/tensorflow_datasets or $TFDS_DATA_DIR), or point at a local "
        "copy with --config.dataset=folder:<dir or .tar.gz> or idx:<dir>.") from None
  return builder, sources


def _tfds(name: str):
  builder, sources = open_tfds(import_tfds(name), name)
  arrays = []
  for split in ("train", "test"):
    src = sources[split]
    records = [src[i] for i in range(len(src))]
    image_key = "image" if "image" in records[0] else next(iter(records[0]))
    x = np.stack([np.asarray(r[image_key]) for r in records])
    arrays += [x if x.ndim == 4 else x[..., None],
               np.asarray([r["label"] for r in records], np.int32)]
  num_classes = builder.info.features["label"].num_classes
  return tuple(arrays), num_classes


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  import jax
  n, _, _, c = images.shape
  return np.asarray(jax.image.resize(images.astype(np.float32), (n, size, size, c), "linear"))


def load(spec: str, image_size: int | None = None) -> Dataset:
  """Reads a dataset spec (see the module docstring) into normalised arrays,
  optionally resized to ``image_size`` x ``image_size``."""
  kind, _, arg = spec.partition(":")
  if kind == "digits" and not arg:
    (tx, ty, vx, vy), n = _digits()
  elif kind == "idx" and arg:
    (tx, ty, vx, vy), n = _idx(arg)
  elif kind == "folder" and arg:
    (tx, ty, vx, vy), n = _folder(arg)
  elif kind == "tfds" and arg:
    (tx, ty, vx, vy), n = _tfds(arg)
  else:
    raise DataError(f"unknown dataset spec {spec!r}; use 'digits', 'tfds:<name>', "
                    "'idx:<dir>' or 'folder:<dir or .tar.gz>'.")
  if image_size and tx.shape[1:3] != (image_size, image_size):
    tx, vx = _resize(tx, image_size), _resize(vx, image_size)
  tx, vx = _normalise(tx, vx)
  return Dataset(tx, ty, vx, vy, n, spec)


def host_slice(global_batch: int, process_index: int | None = None,
               process_count: int | None = None) -> slice:
  """This host's part of every global batch: under ``jax.distributed`` each
  host reads a disjoint, equal slice, so every example is read by one host."""
  import jax
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  if global_batch % n:
    raise DataError(f"batch size {global_batch} must be a multiple of the {n} hosts.")
  local = global_batch // n
  return slice(p * local, (p + 1) * local)


def train_batches(ds: Dataset, batch_size: int, seed: int, epoch: int, start: int = 0,
                  process_index: int | None = None, process_count: int | None = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of shuffled full global batches from batch ``start`` on, this
  host's slice of each; the order depends only on (seed, epoch), so a resumed
  run sees exactly the batches an uninterrupted one would."""
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(ds.train_x))
  mine = host_slice(batch_size, process_index, process_count)
  for first in range(start * batch_size, len(order) - batch_size + 1, batch_size):
    idx = order[first:first + batch_size][mine]
    yield ds.train_x[idx], ds.train_y[idx]


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int,
                 process_index: int | None = None, process_count: int | None = None):
  """Fixed-size global batches (this host's slice of each) with a 0/1 weight, so
  the last partial batch counts exactly once."""
  mine = host_slice(batch_size, process_index, process_count)
  for start in range(0, len(x), batch_size):
    bx, by = x[start:start + batch_size], y[start:start + batch_size]
    pad = batch_size - len(bx)
    weight = np.concatenate([np.ones(len(bx), np.float32), np.zeros(pad, np.float32)])
    if pad:
      bx = np.concatenate([bx, np.zeros((pad,) + bx.shape[1:], bx.dtype)])
      by = np.concatenate([by, np.zeros(pad, by.dtype)])
    yield bx[mine], by[mine], weight[mine]
