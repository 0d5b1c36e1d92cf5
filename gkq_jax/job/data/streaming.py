"""Streaming input for datasets that do not fit in memory, on one host or many.

Examples are read on demand through grain: a TFDS ``data_source`` (random
access, no TensorFlow at run time) or an image folder, decoded, resized and
normalised in worker processes. Each host reads only its own shard of the
training set (``jax.process_index()`` of ``jax.process_count()``); the order
of an epoch is a pure function of (seed, epoch), and the iterator's own state
goes into the training checkpoint, so a killed run continues with the batches
an uninterrupted one would see.

:func:`open_stream` gives an object with the interface of the in-memory
``data.Dataset`` (``num_train``, ``sample_shape``, ``train_batches``,
``test_batches``, validation), so the training loop takes either.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain.python as grain
import numpy as np

from gkq_jax.job.data import images as data_lib

# Normalisation statistics come from this many training examples (a seeded
# sample): enough for per-channel mean / std to 3 digits, cheap to decode.
_STATS_SAMPLE = 1024


# ------------------------------------------------------------------ sources


class _FolderSource(grain.RandomAccessDataSource):
  """(path, label) pairs of an image folder; records are the raw file bytes."""

  def __init__(self, files: Sequence[tuple[str, int]]):
    self._files = list(files)

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int):
    path, label = self._files[index]
    return {"path": path, "label": label}


class _TfdsSource(grain.RandomAccessDataSource):
  """A TFDS ``data_source`` split; records are decoded numpy images."""

  def __init__(self, source, image_key: str):
    self._source = source
    self._image_key = image_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    record = self._source[int(index)]
    return {"image": np.asarray(record[self._image_key]), "label": int(record["label"])}


class _Subset(grain.RandomAccessDataSource):
  """Records ``indices`` of another source (a split carved from it)."""

  def __init__(self, source, indices: np.ndarray):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    return self._source[int(self._indices[index])]


def _decode(record: dict, image_size: int) -> np.ndarray:
  """uint8 (H, W, C) image of a record, resized when ``image_size`` is set."""
  if "path" in record:
    return data_lib.read_image(record["path"], image_size)
  image = record["image"]
  image = image[..., None] if image.ndim == 2 else image
  if image_size and image.shape[:2] != (image_size, image_size):
    from PIL import Image
    gray = image.shape[-1] == 1
    resized = Image.fromarray(image[..., 0] if gray else image).resize(
        (image_size, image_size), Image.BILINEAR)
    image = np.asarray(resized).reshape(image_size, image_size, -1)
  return image


class _Prepare(grain.MapTransform):
  """Decode, check the size, normalise: (float32 image, int32 label). Runs in
  grain's worker processes, so it holds only picklable numpy state."""

  def __init__(self, shape: tuple[int, ...], image_size: int, mean: np.ndarray,
               std: np.ndarray):
    self.shape, self.image_size, self.mean, self.std = tuple(shape), image_size, mean, std

  def map(self, record):
    image = _decode(record, self.image_size)
    if image.shape != self.shape:
      where = record.get("path", "a record")
      raise data_lib.DataError(f"{where} is {image.shape}, the dataset's images are "
                               f"{self.shape}; set --config.image_size to resize them all.")
    x = (image.astype(np.float32) - self.mean) / self.std
    return x, np.int32(record["label"])


# ----------------------------------------------------------------- the data


@dataclasses.dataclass
class StreamingDataset:
  """A dataset read on demand; see the module docstring."""

  name: str
  num_classes: int
  sample_shape: tuple[int, ...]
  train_source: Any
  test_source: Any
  prepare: _Prepare
  workers: int = 0
  val_source: Any = None

  @property
  def num_train(self) -> int:
    return len(self.train_source)

  @property
  def has_validation(self) -> bool:
    return self.val_source is not None

  def _loader(self, source, sampler, batch: int) -> grain.DataLoader:
    return grain.DataLoader(data_source=source, sampler=sampler,
                            operations=[self.prepare, grain.Batch(batch, drop_remainder=True)],
                            worker_count=self.workers)

  def train_batches(self, batch_size: int, seed: int, epoch: int, resume: dict | None = None,
                    process_index: int | None = None, process_count: int | None = None):
    """This host's batches of one epoch: its shard of the training set in an
    order drawn from (seed, epoch), ``batch_size / hosts`` examples each.
    ``resume`` is a position saved by the training loop: the iterator's own
    state puts it back exactly where it was."""
    share = data_lib.host_slice(batch_size, process_index, process_count)
    hosts = batch_size // (share.stop - share.start)
    shard = grain.ShardOptions(shard_index=share.start // (share.stop - share.start),
                               shard_count=hosts, drop_remainder=True)
    sampler = grain.IndexSampler(self.num_train, shard, shuffle=True, num_epochs=1,
                                 seed=_epoch_seed(seed, epoch))
    iterator = iter(self._loader(self.train_source, sampler, share.stop - share.start))
    if resume and resume.get("iterator"):
      iterator.set_state(resume["iterator"].encode())
    return iterator

  def _eval_batches(self, source, batch_size: int):
    """Global batches of ``source`` in order, this host's slice of each, with
    0/1 weights so the last partial batch counts exactly once."""
    mine = data_lib.host_slice(batch_size)
    n = len(source)
    for start in range(0, n, batch_size):
      idx = np.arange(start, start + batch_size)[mine]
      weight = (idx < n).astype(np.float32)
      rows = [self.prepare.map(source[int(i)]) for i in np.minimum(idx, n - 1)]
      yield (np.stack([r[0] for r in rows]), np.asarray([r[1] for r in rows], np.int32),
             weight)

  def test_batches(self, batch_size: int):
    return self._eval_batches(self.test_source, batch_size)

  def validation_batches(self, batch_size: int):
    return self._eval_batches(self.val_source, batch_size)


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.default_rng([seed, epoch]).integers(0, 2 ** 31 - 1))


def carve_validation(ds: StreamingDataset, size: int, seed: int) -> StreamingDataset:
  """Moves ``size`` training examples (drawn by ``seed``) to a validation
  split, as :func:`gkq_jax.job.data.carve_validation` does in memory."""
  n = ds.num_train
  if not 0 < size < n:
    raise data_lib.DataError(f"validation_size={size} must be between 1 and {n - 1} (the "
                             f"training set of {ds.name} has {n} examples); set "
                             "--config.validation_size=0 for no validation split.")
  order = np.random.default_rng([seed, 0x5A11]).permutation(n)
  return dataclasses.replace(ds, train_source=_Subset(ds.train_source, np.sort(order[size:])),
                             val_source=_Subset(ds.train_source, np.sort(order[:size])))


# ------------------------------------------------------------------ opening


def _folder_sources(spec: str):
  path = data_lib.resolve_folder(spec)
  if (path / "train").is_dir() and (path / "test").is_dir():
    train, classes = data_lib.class_files(path / "train")
    test, _ = data_lib.class_files(path / "test", classes)
  else:
    files, classes = data_lib.class_files(path)
    order = np.random.default_rng(0).permutation(len(files))
    n_test = int(round(len(files) * 0.2))
    test = [files[i] for i in sorted(order[:n_test])]
    train = [files[i] for i in sorted(order[n_test:])]
  return _FolderSource(train), _FolderSource(test), len(classes)


def _tfds_sources(name: str):
  tfds = data_lib.import_tfds(name)
  builder, sources = data_lib.open_tfds(tfds, name)
  first = sources["train"][0]
  image_key = "image" if "image" in first else next(iter(first))
  return (_TfdsSource(sources["train"], image_key), _TfdsSource(sources["test"], image_key),
          builder.info.features["label"].num_classes)


def _statistics(source, image_size: int, seed: int):
  """Per-channel mean and std of a seeded sample of the training images."""
  n = len(source)
  picks = np.random.default_rng([seed, 0x57A7]).permutation(n)[:_STATS_SAMPLE]
  images = [_decode(source[int(i)], image_size) for i in picks]
  shape = images[0].shape
  for i, image in zip(picks, images):
    if image.shape != shape:
      where = source[int(i)].get("path", f"record {i}")
      raise data_lib.DataError(f"images of mixed sizes: {where} is {image.shape}, others "
                               f"{shape}; set --config.image_size to resize them all.")
  stack = np.stack(images).astype(np.float32)
  mean = stack.mean(axis=(0, 1, 2))
  std = stack.std(axis=(0, 1, 2)) + 1e-6
  return shape, mean.astype(np.float32), std.astype(np.float32)


def open_stream(spec: str, image_size: int = 0, workers: int = 0,
                seed: int = 0) -> StreamingDataset:
  """A streaming dataset for ``tfds:<name>`` or ``folder:<dir or .tar.gz>``."""
  kind, _, arg = spec.partition(":")
  if kind == "folder" and arg:
    train, test, num_classes = _folder_sources(arg)
  elif kind == "tfds" and arg:
    train, test, num_classes = _tfds_sources(arg)
  else:
    raise data_lib.DataError(f"dataset {spec!r} cannot be streamed; streaming reads "
                             "'tfds:<name>' or 'folder:<dir or .tar.gz>' (the others fit in "
                             "memory: set --config.stream=False).")
  shape, mean, std = _statistics(train, image_size, seed)
  return StreamingDataset(spec, num_classes, shape, train, test,
                          _Prepare(shape, image_size, mean, std), workers)
