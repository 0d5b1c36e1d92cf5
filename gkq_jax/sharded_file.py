"""The compressed file of a sharded model: one ``.gkq`` per process and an index.

A model sharded over devices (and hosts) is written without gathering it: each
process writes the shards it holds (:func:`save_sharded`), every one a small
tree in the ordinary file format (:func:`gkq_jax.save`: codebooks and
entropy-coded indices). A clustered leaf's shard is itself a ClusteredArray (a
device's block of channels with their codebooks, or its block of indices with
the layer's codebook), so it is coded as well as a whole leaf would be.

    folder/index.json                  the tree: paths, global shapes, dtypes, specs
    folder/process-00000.gkq           process 0's shards
    folder/process-00000.json          where each of its shards lies in the global arrays
    folder/process-00001.gkq ...

:func:`load_sharded` puts every leaf back where the caller's shardings say
(each process reads only the shards it needs), or whole on the default device
when no sharding is given. Dicts of leaves (linen params, ``nnx.to_pure_dict``)
are supported; replicated shards are written once.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np

from gkq_jax import encode
from gkq_jax._paths import named_leaves
from gkq_jax.clustered import ClusteredArray, is_clustered

INDEX = "index.json"


def _own_shards(array) -> list:
  """This process's shards of ``array`` that it alone writes (replica 0)."""
  return [s for s in array.addressable_shards if s.replica_id == 0]


def _bounds(index, shape) -> list[list[int]]:
  return [[0 if s.start is None else s.start, n if s.stop is None else s.stop]
          for s, n in zip(index, shape)]


def save_sharded(folder, tree: Any) -> dict:
  """Writes this process's shards of ``tree`` (jax.Arrays, ClusteredArray leaves);
  every process of a ``jax.distributed`` job calls it with the same folder.
  Returns {"bytes": this process's file size, "shards": how many it wrote}."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  process = jax.process_index()
  local, places, index = {}, {}, {}
  for path, leaf in named_leaves(tree, is_leaf=is_clustered):
    if is_clustered(leaf):
      if leaf.sparse is not None:
        raise ValueError(f"save_sharded: {path} has a sparse part (dense-and-sparse), which "
                         "the sharded file does not split; save it with gkq_jax.save.")
      parts = {"codebook": leaf.codebook, "indices": leaf.indices}
      index[path] = {"kind": "clustered", **{n: [list(a.shape), str(a.dtype)]
                                              for n, a in parts.items()},
                     "fields": _fields(leaf)}
      books = {s.device: s for s in leaf.codebook.addressable_shards}
      for n, shard in enumerate(_own_shards(leaf.indices)):
        book = books[shard.device]
        key = f"{path}#{n}"
        local[key] = leaf.replace(codebook=np.asarray(book.data),
                                  indices=np.asarray(shard.data))
        places[key] = {"leaf": path,
                       "indices": _bounds(shard.index, leaf.indices.shape),
                       "codebook": _bounds(book.index, leaf.codebook.shape)}
    else:
      array = jax.numpy.asarray(leaf)
      index[path] = {"kind": "raw", "array": [list(array.shape), str(array.dtype)]}
      for n, shard in enumerate(_own_shards(array)):
        key = f"{path}#{n}"
        local[key] = np.asarray(shard.data)
        places[key] = {"leaf": path, "array": _bounds(shard.index, array.shape)}
  name = f"process-{process:05d}"
  nbytes, _ = encode.save(folder / f"{name}.gkq", local)
  (folder / f"{name}.json").write_text(json.dumps(places))
  if process == 0:
    (folder / INDEX).write_text(json.dumps({"processes": jax.process_count(), "leaves": index}))
  return {"bytes": nbytes, "shards": len(local)}


def _fields(leaf: ClusteredArray) -> dict:
  return {"vector_shape": leaf.vector_shape, "pinned_zero": leaf.pinned_zero,
          "vector_axis": leaf.vector_axis, "dtype": np.dtype(leaf.dtype).name,
          "stacked": leaf.stacked}


class _Shards:
  """Every saved shard, read lazily file by file."""

  def __init__(self, folder: pathlib.Path):
    self.folder = folder
    meta = folder / INDEX
    if not meta.exists():
      raise ValueError(f"{folder} holds no {INDEX}: is it a folder written by save_sharded?")
    self.index = json.loads(meta.read_text())
    self.places = {}
    for n in range(self.index["processes"]):
      path = folder / f"process-{n:05d}.json"
      if not path.exists():
        raise ValueError(f"{folder}: process {n}'s shards are missing ({path.name}); every "
                         "process of the job that saved it must have finished.")
      for key, place in json.loads(path.read_text()).items():
        self.places[n, key] = place  # keys repeat across processes
    self.files = {}

  def data(self, n: int, key: str):
    if n not in self.files:
      self.files[n] = encode.load(self.folder / f"process-{n:05d}.gkq")
    return self.files[n][key]

  def region(self, leaf: str, part: str, want: list[list[int]], shape, dtype) -> np.ndarray:
    """The block ``want`` of one array of ``leaf``, assembled from saved shards."""
    out = np.zeros([b - a for a, b in want], dtype)
    filled = 0
    for (n, key), place in self.places.items():
      if place["leaf"] != leaf:
        continue
      have = place[part]
      lo = [max(a, c) for (a, _), (c, _) in zip(want, have)]
      hi = [min(b, d) for (_, b), (_, d) in zip(want, have)]
      if any(a >= b for a, b in zip(lo, hi)):
        continue
      data = self.data(n, key)
      if part != "array":
        data = data.codebook if part == "codebook" else data.indices
      src = tuple(slice(a - c, b - c) for a, b, (c, _) in zip(lo, hi, have))
      dst = tuple(slice(a - c, b - c) for a, b, (c, _) in zip(lo, hi, want))
      out[dst] = np.asarray(data)[src]
      filled += int(np.prod([b - a for a, b in zip(lo, hi)]))
    if filled < out.size:
      raise ValueError(f"{self.folder}: the shards of {leaf!r} ({part}) do not cover "
                       f"{want}; the folder is incomplete.")
    return out


def load_sharded(folder, shardings: dict | None = None) -> dict:
  """The tree :func:`save_sharded` wrote, as nested dicts. ``shardings``:
  {leaf path: sharding} (a ClusteredArray leaf takes a (codebook sharding,
  indices sharding) pair), e.g. :func:`shardings_of` the tree that was saved;
  each process then reads only the shards its devices need. Leaves without a
  sharding load whole on the default device."""
  shards = _Shards(pathlib.Path(folder))
  wanted = dict(shardings or {})
  unknown = sorted(set(wanted) - set(shards.index["leaves"]))
  if unknown:
    raise ValueError(f"load_sharded: shardings name {unknown[:3]}, which {folder} does not "
                     f"hold (its leaves: {sorted(shards.index['leaves'])[:3]} ...).")
  tree: dict = {}
  for path, meta in shards.index["leaves"].items():
    if meta["kind"] == "raw":
      leaf = _assemble(shards, path, "array", *meta["array"], wanted.get(path))
    else:
      given = wanted.get(path) or (None, None)
      book = _assemble(shards, path, "codebook", *meta["codebook"], given[0])
      idx = _assemble(shards, path, "indices", *meta["indices"], given[1])
      fields = dict(meta["fields"])
      fields["vector_shape"] = tuple(fields["vector_shape"]) if fields["vector_shape"] else None
      fields["dtype"] = np.dtype(fields["dtype"])
      leaf = ClusteredArray(book, idx, **fields)
    node = tree
    keys = path.split("/")
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = leaf
  return tree


def shardings_of(tree: Any) -> dict:
  """{leaf path: sharding} of a live tree, as :func:`load_sharded` takes it."""
  out = {}
  for path, leaf in named_leaves(tree, is_leaf=is_clustered):
    out[path] = ((leaf.codebook.sharding, leaf.indices.sharding) if is_clustered(leaf)
                 else leaf.sharding)
  return out


def _assemble(shards: _Shards, path, part, shape, dtype, sharding):
  shape, dtype = tuple(shape), np.dtype(dtype)
  if sharding is None:
    whole = shards.region(path, part, [[0, n] for n in shape], shape, dtype)
    return jax.numpy.asarray(whole)
  return jax.make_array_from_callback(
      shape, sharding, lambda index: shards.region(path, part, _bounds(index, shape), shape,
                                                   dtype))
