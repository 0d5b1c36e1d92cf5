"""The compressed file: codebooks + Huffman-coded indices, with a checksum.

Layout: ``MAGIC | u16 version | u32 header length | zlib(JSON header) |
sections | sha256 of everything before it``. Each leaf of the params tree is one entry:

  * ``raw``: the array's bytes (biases, norms, anything not clustered);
  * ``clustered``: the codebook, and the indices coded the smallest of
    three ways: fixed width, Huffman, or (for pruned leaves) Deep
    Compression's relative index: the gaps between non-zero weights (with
    filler entries where a gap overflows its bits) and their indices, both
    Huffman-coded. The codebook is a float32 table (a float16 one where every
    entry is a float16 number, version 4), or (version 3), where
    every row is exactly the uniform grid ``(i + offset) * scale`` with a 0
    entry (a QAT codebook: ``2**bits`` levels per channel), two float32 per
    row, ``offset`` and ``scale``. Where codebook and indices would take more
    bytes than the dense leaf (a tiny layer, 256 levels for a few weights per
    channel), the dequantized weights are stored as they are, in the leaf's
    dtype (version 3), so no leaf takes more room than the weights it replaces.
  * (version 4) a clustered leaf's sparse part (dense-and-sparse: weights kept
    exactly, :class:`gkq_jax.SparseOutliers`): its positions as gaps
    (``p[0]``, then ``p[i] - p[i-1] - 1``) in LEB128 varints, its values'
    bytes in their own dtype (the leaf's, as quantize makes them), entry
    ``sparse``. The indices at those positions are never read, so they are
    left out of the coded indices (and come back as 0). A leaf with a sparse
    part stored dense keeps its positions (the values are in the dense
    weights), so it loads with the same parts.

Loading gives the same ClusteredArrays back (a leaf stored dense comes back as
a ClusteredArray of the same layout, its codebook rows the distinct values of
their weights), so the dequantized params, and the logits computed from them,
are bit-identical to the in-memory model.

Version 2 also stores the tree itself (header ``tree``): dicts with their str
and int keys (a key may contain '/'), lists, tuples, None, FrozenDicts, nnx
States and Variables (Param, BatchStat, RNG keys and counts...), so ``load``
gives back the structure that was saved; other pytree nodes come back as
dicts. An entry's ``path`` joins its keys with '/', each key with '%' and '/'
escaped as %25 and %2F. Version 1 files (paths only), version 2 files
(float32 tables only) and version 3 files (no sparse parts) are still read.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pathlib
import struct
import zlib
from typing import Any, NamedTuple

import flax.core
import jax
import numpy as np
from flax import nnx

from gkq_jax import _distinct, _vectors, huffman
from gkq_jax._paths import path_keys
from gkq_jax.clustered import ClusteredArray, SparseOutliers, is_clustered

MAGIC = b"GKQJAX\0"
FORMAT_VERSION = 4
SPARSE_GAP_BITS = range(2, 9)  # the relative index's gap widths tried


class CorruptFileError(ValueError):
  pass


class _Sections:
  def __init__(self):
    self.buffer = io.BytesIO()

  def add(self, data: bytes) -> list[int]:
    offset = self.buffer.tell()
    self.buffer.write(data)
    return [offset, len(data)]


def _fixed_width(idx: np.ndarray, k: int) -> tuple[int, bytes]:
  bits = max(1, int(np.ceil(np.log2(max(k, 2)))))
  planes = (idx[:, None] >> np.arange(bits - 1, -1, -1)) & 1
  return bits, np.packbits(planes.astype(np.uint8).reshape(-1)).tobytes()


def _relative_index(idx: np.ndarray, gap_bits: int):
  """Deep Compression's sparse format: (stored gaps, values) incl. fillers."""
  pos = np.flatnonzero(idx)
  gaps = np.diff(np.concatenate([[-1], pos]))  # >= 1
  span = 1 << gap_bits
  fillers = (gaps - 1) // span
  last = gaps - fillers * span  # in 1..span
  n = fillers + 1
  stored = np.full(int(n.sum()), span - 1, np.int64)
  ends = np.cumsum(n) - 1
  stored[ends] = last - 1
  values = np.zeros(stored.size, np.int64)
  values[ends] = idx[pos]
  return stored, values


def _encode_stream(stream: dict, sections: _Sections) -> dict:
  return {"lengths": sections.add(stream["lengths"].astype(np.uint8).tobytes()),
          "sync": sections.add(stream["sync"].astype("<u4").tobytes()),
          "data": sections.add(stream["data"]), "count": stream["count"]}


def _encode_indices(idx: np.ndarray, k: int, sparse_ok: bool, sections: _Sections) -> dict:
  candidates = []
  bits, packed = _fixed_width(idx, k)
  candidates.append((len(packed), "fixed", bits, packed))
  stream = huffman.encode(idx, k)
  candidates.append((huffman.nbytes(stream), "huffman", stream))
  if sparse_ok:
    for gap_bits in SPARSE_GAP_BITS:
      stored, values = _relative_index(idx, gap_bits)
      gs, vs = huffman.encode(stored, 1 << gap_bits), huffman.encode(values, k)
      candidates.append((huffman.nbytes(gs) + huffman.nbytes(vs), "sparse", gap_bits, gs, vs))
  best = min(candidates, key=lambda c: c[0])
  if best[1] == "fixed":
    return {"coding": "fixed", "bits": best[2], "data": sections.add(best[3])}
  if best[1] == "huffman":
    return {"coding": "huffman", "stream": _encode_stream(best[2], sections)}
  return {"coding": "sparse", "gap_bits": best[2], "gaps": _encode_stream(best[3], sections),
          "values": _encode_stream(best[4], sections)}


def _stream_bytes(counts: np.ndarray) -> int:
  """Bytes of one Huffman stream of symbols with these counts (code lengths,
  sync offsets, payload), as :func:`huffman.nbytes` of its encoding."""
  count = int(counts.sum())
  lengths = huffman.code_lengths(counts)
  bits = int(np.dot(counts.astype(np.int64), lengths.astype(np.int64)))
  return counts.size + 4 * math.ceil(count / huffman.SYNC) + math.ceil(bits / 8)


def coded_bytes(indices, num_clusters: int, sparse: bool = False) -> int:
  """Bytes :func:`save` spends on one leaf's indices, without coding them: the
  smallest of fixed width, Huffman and, for leaves with a pinned zero
  (``sparse``), Deep Compression's relative index, exactly as
  :func:`_encode_indices` chooses (a test checks the two agree)."""
  idx = np.asarray(indices).reshape(-1).astype(np.int64)
  k = int(num_clusters)
  options = [math.ceil(idx.size * max(1, math.ceil(math.log2(max(k, 2)))) / 8),
             _stream_bytes(np.bincount(idx, minlength=k))]
  pos = np.flatnonzero(idx)
  if sparse and pos.size:
    gaps = np.diff(np.concatenate([[-1], pos]))
    values = np.bincount(idx[pos], minlength=k)
    for gap_bits in SPARSE_GAP_BITS:
      span = 1 << gap_bits
      fillers = (gaps - 1) // span
      n_fill = int(fillers.sum())
      stored = np.bincount(gaps - fillers * span - 1, minlength=span)
      stored[span - 1] += n_fill
      filled_values = values.copy()
      filled_values[0] += n_fill
      options.append(_stream_bytes(stored) + _stream_bytes(filled_values))
  return min(options)


def _grid_values(offset: np.ndarray, scale: np.ndarray, k: int) -> np.ndarray:
  """Rows ``(i + offset) * scale``, i = 0..k-1, in float32 as load rebuilds them."""
  return ((np.arange(k, dtype=np.float32)[None, :] + offset[:, None].astype(np.float32))
          * scale[:, None].astype(np.float32))


def _grid(book: np.ndarray):
  """(offset, scale) per codebook row when every row is exactly a uniform grid
  ``(i + offset) * scale`` with a 0 entry (bit for bit, as :func:`_grid_values`
  rebuilds it) and two numbers per row are fewer than the table; else None."""
  k = book.shape[-1]
  rows = book.reshape(-1, k)
  if k < 3:
    return None
  zero = rows == 0
  if not zero.any(axis=1).all():
    return None
  at = np.argmax(zero, axis=1)  # offset = -at: (at + offset) * scale = 0
  r = np.arange(rows.shape[0])
  # The neighbour of the 0 entry is +-scale exactly: (+-1) * scale rounds to itself.
  scale = np.where(at + 1 < k, rows[r, np.minimum(at + 1, k - 1)],
                   -rows[r, np.maximum(at - 1, 0)]).astype(np.float32)
  offset = (-at).astype(np.float32)
  if not np.isfinite(scale).all():
    return None
  if not np.array_equal(_grid_values(offset, scale, k).view(np.uint32), rows.view(np.uint32)):
    return None
  return offset, scale


def _varint_encode(values: np.ndarray) -> bytes:
  """Non-negative integers as LEB128 varints (7 bits a byte, high bit: more follow)."""
  v = np.asarray(values, np.uint64).reshape(-1)
  if v.size == 0:
    return b""
  n = np.ones(v.size, np.int64)
  rest = v >> np.uint64(7)
  while rest.any():
    n += rest > 0
    rest >>= np.uint64(7)
  start = np.cumsum(n) - n
  out = np.zeros(int(n.sum()), np.uint8)
  for j in range(int(n.max())):
    at = n > j
    byte = (v[at] >> np.uint64(7 * j)) & np.uint64(0x7F)
    more = (n[at] - 1 > j).astype(np.uint64) << np.uint64(7)
    out[start[at] + j] = (byte | more).astype(np.uint8)
  return out.tobytes()


def _varint_decode(data: bytes, count: int, name: str) -> np.ndarray:
  b = np.frombuffer(data, np.uint8)
  last = b < 0x80
  if int(last.sum()) != count or (b.size and not last[-1]):
    raise CorruptFileError(f"{name}: the sparse positions do not decode to {count} numbers; "
                           "write the file again.")
  if count == 0:
    return np.zeros(0, np.int64)
  number = np.concatenate([[0], np.cumsum(last[:-1])]).astype(np.int64)
  first = np.concatenate([[0], np.flatnonzero(last)[:-1] + 1])
  shift = (np.arange(b.size) - first[number]).astype(np.uint64) * np.uint64(7)
  out = np.zeros(count, np.uint64)
  np.add.at(out, number, (b & 0x7F).astype(np.uint64) << shift)
  return out.astype(np.int64)


def _sparse_host(leaf) -> tuple[np.ndarray, np.ndarray] | None:
  """(sorted in-range positions, their values) of a leaf's sparse part, or None."""
  if leaf.sparse is None:
    return None
  pos = np.asarray(leaf.sparse.positions).reshape(-1).astype(np.int64)
  values = np.asarray(leaf.sparse.values).reshape(-1)
  keep = pos < math.prod(leaf.shape)
  pos, values = pos[keep], values[keep]
  order = np.argsort(pos, kind="stable")
  return pos[order], values[order]


def _position_bytes(pos: np.ndarray) -> bytes:
  return _varint_encode(np.diff(np.concatenate([[-1], pos])) - 1)


def _coded_indices(leaf) -> np.ndarray:
  """The flat indices the file codes: for scalar layouts, those at the sparse
  part's positions left out (a vector's index serves other weights too)."""
  idx = np.asarray(leaf.indices).reshape(-1).astype(np.int64)
  sparse = _sparse_host(leaf)
  if sparse is None or leaf.vector_shape is not None:
    return idx
  return np.delete(idx, sparse[0])


class _Costs(NamedTuple):
  book: int  # codebook bytes
  grid: Any  # (offset, scale) or None
  indices: int  # coded index bytes
  dense: int  # the dense weights' bytes
  positions: int = 0  # the sparse part's coded positions
  values: int = 0  # and its values

  @property
  def clustered(self) -> int:
    return self.book + self.indices + self.positions + self.values

  def stored(self, dense_ok: bool) -> int:
    """Bytes of the cheaper of the two forms (dense: the weights, plus the positions)."""
    if dense_ok and self.dense + self.positions < self.clustered:
      return self.dense + self.positions
    return self.clustered


def _clustered_costs(leaf) -> _Costs:
  """What each part of a ClusteredArray takes in the file."""
  book = np.asarray(leaf.codebook, np.float32)
  grid = None if leaf.vector_shape else _grid(book)
  book_bytes = (8 * grid[0].size if grid is not None else
                2 * book.size if _half_exact(book) else 4 * book.size)
  sparse = leaf.pinned_zero and leaf.vector_shape is None
  index_bytes = coded_bytes(_coded_indices(leaf), leaf.num_clusters, sparse=sparse)
  dense_bytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
  kept = _sparse_host(leaf)
  if kept is None:
    return _Costs(book_bytes, grid, index_bytes, dense_bytes)
  return _Costs(book_bytes, grid, index_bytes, dense_bytes, len(_position_bytes(kept[0])),
                kept[1].nbytes)


def _half_exact(book: np.ndarray) -> bool:
  """Whether every codebook entry is a float16 number (a codebook rounded to half
  precision, as LUT kernels hold it): then the file keeps two bytes an entry."""
  half = book.astype(np.float16)
  return bool(np.isfinite(half).all()) and np.array_equal(
      half.astype(np.float32).view(np.uint32), book.view(np.uint32))


def _dense_ok(leaf) -> bool:
  """Whether the leaf may be stored dense (a vector leaf with a sparse part may not:
  its codebook could not be rebuilt from the weights)."""
  return leaf.sparse is None or leaf.vector_shape is None


def stored_bytes(leaf) -> int:
  """Bytes :func:`save` spends on one leaf: a dense array's bytes; for a
  :class:`ClusteredArray` its codebook (a float32 table, or two float32 per
  row for uniform grids) plus its coded indices (:func:`coded_bytes`) plus
  its sparse part (coded positions and values), or the dense weights (and
  the sparse part's positions) where those take fewer bytes than that."""
  if not is_clustered(leaf):
    return int(np.asarray(leaf).nbytes)
  return int(_clustered_costs(leaf).stored(_dense_ok(leaf)))


def _escape(key) -> str:
  return str(key).replace("%", "%25").replace("/", "%2F")


def _children(node) -> list[tuple[Any, Any]]:
  """(key, child) one level down, in the order jax flattens them."""
  flat, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
  return [(path_keys(p)[0] if path_keys(p) else "value", child) for p, child in flat]


def _is_leaf(node) -> bool:
  return is_clustered(node) or jax.tree_util.treedef_is_leaf(
      jax.tree_util.tree_structure(node, is_leaf=is_clustered))


def _json_metadata(variable) -> dict:
  """The JSON-safe part of a Variable's metadata (tags, flags)."""
  safe = (str, int, float, bool, type(None))
  return {k: v for k, v in variable.get_metadata().items() if isinstance(v, safe)}


def _describe(node, keys: tuple, leaves: list):
  """The JSON spec of ``node``; its leaves are appended to ``leaves``."""
  if node is None:
    return {"none": True}
  if _is_leaf(node):
    leaves.append((keys, node))
    return len(leaves) - 1
  if isinstance(node, nnx.Variable):
    cls = type(node)
    return {"variable": f"{cls.__module__}:{cls.__qualname__}",
            "metadata": _json_metadata(node), "value": _describe(node.get_value(), keys, leaves)}
  if isinstance(node, nnx.State):
    kind = "state"
  elif isinstance(node, flax.core.FrozenDict):
    kind = "frozendict"
  elif isinstance(node, dict):
    kind = "dict"
  elif type(node) in (list, tuple):
    kind = type(node).__name__
  else:
    kind = "dict"  # other pytree nodes (namedtuples, dataclasses) come back as dicts
  children = []
  for key, child in _children(node):
    if isinstance(key, bool) or not isinstance(key, (str, int)):
      raise ValueError(f"cannot save the key {key!r} (a {type(key).__name__}) under "
                       f"{'/'.join(map(_escape, keys)) or 'the root'!r}: keys must be str or "
                       "int; rename it.")
    children.append([key, _describe(child, keys + (key,), leaves)])
  if kind in ("list", "tuple"):
    return {kind: [spec for _, spec in children]}
  return {kind: children}


def _leaf_entry(name: str, leaf, sections: _Sections) -> dict:
  if is_clustered(leaf):
    book = np.asarray(leaf.codebook, np.float32)
    idx = np.asarray(leaf.indices).reshape(-1).astype(np.int64)
    stacked = {"stacked": int(leaf.stacked)} if leaf.stacked else {}  # older files: none
    entry = {
        **stacked, "path": name, "kind": "clustered", "index_shape": list(leaf.indices.shape),
        "index_dtype": str(np.asarray(leaf.indices).dtype), "codebook_shape": list(book.shape),
        "vector_shape": list(leaf.vector_shape) if leaf.vector_shape else None,
        "vector_axis": int(leaf.vector_axis),
        "pinned_zero": bool(leaf.pinned_zero), "dtype": np.dtype(leaf.dtype).name}
    costs = _clustered_costs(leaf)
    kept = _sparse_host(leaf)
    if kept is not None:
      entry["sparse"] = {"count": int(kept[0].size),
                         "positions": sections.add(_position_bytes(kept[0]))}
      idx = _coded_indices(leaf)
    if costs.stored(_dense_ok(leaf)) < costs.clustered:  # the codebook costs more than it saves
      dense = np.asarray(leaf.dequantize())
      return {**entry, "dense": sections.add(dense.tobytes())}
    if kept is not None:
      entry["sparse"].update({"dtype": kept[1].dtype.name,
                              "values": sections.add(kept[1].tobytes())})
    if costs.grid is None and _half_exact(book):
      entry["codebook16"] = sections.add(book.astype("<f2").tobytes())
    elif costs.grid is None:
      entry["codebook"] = sections.add(book.tobytes())
    else:
      entry["grid"] = {"offset": sections.add(costs.grid[0].astype("<f4").tobytes()),
                       "scale": sections.add(costs.grid[1].astype("<f4").tobytes())}
    return {**entry, "indices": _encode_indices(
        idx, leaf.num_clusters, leaf.pinned_zero and leaf.vector_shape is None, sections)}
  entry = {"path": name, "kind": "raw"}
  if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
    entry["key_impl"] = str(jax.random.key_impl(leaf))
    leaf = jax.random.key_data(leaf)
  array = np.asarray(leaf)
  if array.dtype.hasobject:
    raise ValueError(f"cannot save the leaf at {name!r}: a {type(leaf).__name__} is not an "
                     "array.")
  entry.update({"dtype": str(array.dtype),
                "shape": list(array.shape), "data": sections.add(array.tobytes())})
  return entry


def save(path, tree: Any) -> tuple[int, dict]:
  """Writes a (partly) quantized params tree, its structure included.

  Returns the file size in bytes and, per leaf path (keys joined by '/', a '/'
  inside a key escaped as %2F), the bytes its sections take (as
  :func:`stored_bytes` computes them) and how its indices were coded ("raw"
  for a clustered leaf stored dense); a clustered leaf's entry also says how
  its codebook was stored ("table", "grid" or "none (dense)") and, with a
  sparse part, how many weights that keeps exactly ("sparse"). Raises before
  writing anything if the tree has a key that is neither str nor int, or two
  keys that differ only in type.
  """
  leaves: list = []
  spec = _describe(tree, (), leaves)
  sections, entries, sizes = _Sections(), [], {}
  for keys, leaf in leaves:
    name = "/".join(_escape(k) for k in keys)
    if name in sizes:
      raise ValueError(f"two leaves are both named {name!r} (keys that differ only in type, "
                       "such as 1 and '1'); rename one before saving.")
    before = sections.buffer.tell()
    entries.append(_leaf_entry(name, leaf, sections))
    coding = entries[-1]["indices"]["coding"] if "indices" in entries[-1] else "raw"
    sizes[name] = {"bytes": sections.buffer.tell() - before, "coding": coding}
    if entries[-1]["kind"] == "clustered":
      sizes[name]["codebook"] = ("grid" if "grid" in entries[-1] else
                                 "table" if "codebook" in entries[-1] else
                                 "float16 table" if "codebook16" in entries[-1] else
                                 "none (dense)")
      if "sparse" in entries[-1]:
        sizes[name]["sparse"] = entries[-1]["sparse"]["count"]
  header = zlib.compress(json.dumps({"entries": entries, "tree": spec},
                                    separators=(",", ":")).encode(), 9)
  body = (MAGIC + struct.pack("<HI", FORMAT_VERSION, len(header)) + header
          + sections.buffer.getvalue())
  data = body + hashlib.sha256(body).digest()
  pathlib.Path(path).write_bytes(data)
  return len(data), sizes


def _decode_stream(spec: dict, section) -> np.ndarray:
  return huffman.decode(np.frombuffer(section(spec["lengths"]), np.uint8),
                        np.frombuffer(section(spec["sync"]), "<u4"), section(spec["data"]),
                        spec["count"])


def _decode_indices(spec: dict, n: int, section) -> np.ndarray:
  if spec["coding"] == "fixed":
    bits = np.unpackbits(np.frombuffer(section(spec["data"]), np.uint8))[:n * spec["bits"]]
    planes = bits.reshape(n, spec["bits"]).astype(np.int64)
    return (planes << np.arange(spec["bits"] - 1, -1, -1)).sum(1)
  if spec["coding"] == "huffman":
    return _decode_stream(spec["stream"], section)
  stored = _decode_stream(spec["gaps"], section)
  values = _decode_stream(spec["values"], section)
  idx = np.zeros(n, np.int64)
  positions = np.cumsum(stored + 1) - 1
  idx[positions] = values
  return idx


def _variable_types() -> dict[str, type]:
  """Every nnx Variable class now defined, by 'module:qualname' (a file names
  one of these; nothing is imported or called by a name read from a file)."""
  found, todo = {}, [nnx.Variable]
  while todo:
    cls = todo.pop()
    found[f"{cls.__module__}:{cls.__qualname__}"] = cls
    todo.extend(cls.__subclasses__())
  return found


def _rebuild(spec, leaves: list, variable_types: dict):
  if isinstance(spec, int):
    return leaves[spec]
  if "variable" in spec:
    value = _rebuild(spec["value"], leaves, variable_types)
    cls = variable_types.get(spec["variable"])
    if cls is None:  # a Variable type not defined in this process: its bare value
      return value
    try:
      return cls(value, **spec["metadata"])
    except TypeError:
      return cls(value)
  (kind, body), = spec.items()
  if kind == "none":
    return None
  if kind in ("list", "tuple"):
    items = [_rebuild(s, leaves, variable_types) for s in body]
    return items if kind == "list" else tuple(items)
  children = {key: _rebuild(s, leaves, variable_types) for key, s in body}
  if kind == "state":
    return nnx.State(children)
  if kind == "frozendict":
    return flax.core.FrozenDict(children)
  return children


def _leaf_from_entry(entry: dict, section):
  if entry["kind"] == "raw":
    leaf = np.frombuffer(section(entry["data"]), entry["dtype"]).reshape(entry["shape"])
    if "key_impl" in entry:
      leaf = jax.random.wrap_key_data(leaf, impl=entry["key_impl"])
    return leaf
  vector = tuple(entry["vector_shape"]) if entry["vector_shape"] else None
  layout = dict(vector_shape=vector, pinned_zero=entry["pinned_zero"],
                vector_axis=entry.get("vector_axis", 0),
                dtype=np.dtype(entry.get("dtype", "float32")), stacked=int(entry.get("stacked", 0)))
  n = int(np.prod(entry["index_shape"]))
  kept = None
  if "sparse" in entry:  # version 4
    spec = entry["sparse"]
    gaps = _varint_decode(section(spec["positions"]), spec["count"], entry["path"])
    pos = np.cumsum(gaps + 1) - 1
    size = n * (math.prod(vector) if vector else 1)  # the dense weight's
    if pos.size and pos[-1] >= size:
      raise CorruptFileError(f"{entry['path']}: a sparse position lies outside the {size} "
                             "weights; write the file again.")
    kept = pos
  if "dense" in entry:
    dense = np.frombuffer(section(entry["dense"]), layout["dtype"])
    leaf = _from_dense(entry, dense, layout, kept)
    if kept is None:
      return leaf
    return leaf.replace(sparse=SparseOutliers(jax.numpy.asarray(kept, np.int32),
                                              jax.numpy.asarray(dense[kept])))
  shape = entry["codebook_shape"]
  if "grid" in entry:
    offset = np.frombuffer(section(entry["grid"]["offset"]), "<f4")
    scale = np.frombuffer(section(entry["grid"]["scale"]), "<f4")
    book = _grid_values(offset, scale, shape[-1]).reshape(shape)
  elif "codebook16" in entry:
    book = np.frombuffer(section(entry["codebook16"]), "<f2").astype(np.float32).reshape(shape)
  else:
    book = np.frombuffer(section(entry["codebook"]), np.float32).reshape(shape)
  sparse = None
  if kept is None or vector:
    idx = _decode_indices(entry["indices"], n, section)
  else:
    idx = np.zeros(n, np.int64)
    coded = np.ones(n, bool)
    coded[kept] = False
    idx[coded] = _decode_indices(entry["indices"], n - kept.size, section)
  if kept is not None:
    values = np.frombuffer(section(entry["sparse"]["values"]), entry["sparse"]["dtype"])
    if values.size != kept.size:
      raise CorruptFileError(f"{entry['path']}: {values.size} sparse values for {kept.size} "
                             "positions; write the file again.")
    sparse = SparseOutliers(jax.numpy.asarray(kept, np.int32), jax.numpy.asarray(values))
  return ClusteredArray(jax.numpy.asarray(book),
                        jax.numpy.asarray(idx.astype(entry["index_dtype"]).reshape(
                            entry["index_shape"])), **layout, sparse=sparse)


def _from_dense(entry: dict, dense: np.ndarray, layout: dict, kept=None) -> ClusteredArray:
  """The ClusteredArray of a leaf stored dense: each codebook row holds the distinct
  values (by their bits) of the weights it serves, sorted, padded with the last;
  a pinned zero stays at index 0. It dequantizes to ``dense`` bit for bit.
  Positions ``kept`` (a sparse part's, scalar layouts) are left out of the
  codebooks and get index 0; the caller adds the sparse part."""
  shape, index_shape = entry["codebook_shape"], tuple(entry["index_shape"])
  x = jax.numpy.asarray(dense.astype(np.float32))
  if layout["vector_shape"] is not None:
    points, _ = _vectors.to_points(
        x.reshape(ClusteredArray(np.zeros(shape), np.zeros(index_shape), **layout).shape),
        layout["vector_axis"], layout["vector_shape"])
    book, idx = _distinct.distinct_vectors(np.asarray(points), bitwise=True)
    if len(book) > shape[0]:
      raise CorruptFileError(f"{entry['path']}: {len(book)} distinct vectors stored dense for "
                             f"a codebook of {shape[0]}; write the file again.")
    book = np.concatenate([book, np.repeat(book[-1:], shape[0] - len(book), axis=0)])
  else:
    rows = int(np.prod(shape[:-1]))
    seg = ClusteredArray(np.zeros(shape, np.float32), np.zeros(index_shape, np.int32),
                         **layout).codebook_rows().reshape(-1)
    n = seg.size
    x = x.reshape(-1)
    if kept is not None:  # only the clustered weights make the codebooks
      free = np.ones(n, bool)
      free[kept] = False
      free = np.flatnonzero(free)
      x, seg = x[free], seg[free]
    if layout["pinned_zero"]:  # a 0 in every row, so that it takes index 0
      x = jax.numpy.concatenate([x.reshape(-1), jax.numpy.zeros(rows, np.float32)])
      seg = jax.numpy.concatenate([seg, jax.numpy.arange(rows, dtype=np.int32)])
    count, book, idx = _distinct.distinct(x.reshape(-1), seg, num_groups=rows, width=shape[-1],
                                          zero_first=layout["pinned_zero"], bitwise=True)
    if int(np.max(count)) > shape[-1]:
      raise CorruptFileError(f"{entry['path']}: {int(np.max(count))} distinct values stored "
                             f"dense for a codebook row of {shape[-1]}; write the file again.")
    book, idx = np.asarray(book).reshape(shape), np.asarray(idx)
    if kept is None:
      idx = idx[:n]
    else:
      full = np.zeros(n, np.int64)
      full[free] = idx[:free.size]
      idx = full
  return ClusteredArray(jax.numpy.asarray(book), jax.numpy.asarray(
      np.asarray(idx).astype(entry["index_dtype"]).reshape(index_shape)), **layout)


def _nested_by_path(entries: list[dict], leaves: list) -> dict:
  """Version 1 files: nested dicts from the '/'-joined paths."""
  tree: dict = {}
  for entry, leaf in zip(entries, leaves):
    node = tree
    keys = entry["path"].split("/")
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = leaf
  return tree


def _restore_into(target, loaded, path, by_string: bool):
  """``loaded``'s leaves placed in ``target``'s structure, matched by key path."""
  norm = (lambda keys: tuple(map(str, keys))) if by_string else (lambda keys: keys)
  flat, _ = jax.tree_util.tree_flatten_with_path(loaded, is_leaf=is_clustered)
  found = {norm(path_keys(p)): leaf for p, leaf in flat}
  target_flat, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=is_clustered)
  out = []
  for p, wanted in target_flat:
    keys = path_keys(p)
    name = "/".join(_escape(k) for k in keys)
    if norm(keys) not in found:
      sample = ", ".join(repr("/".join(map(_escape, k))) for k in list(found)[:3])
      raise ValueError(f"load: the target's {name!r} is not in {path} (its paths look like "
                       f"{sample}); pass a target with the structure that was saved.")
    leaf = found[norm(keys)]
    shape = tuple(leaf.shape if is_clustered(leaf) else np.shape(leaf))
    if hasattr(wanted, "shape") and tuple(wanted.shape) != shape:
      raise ValueError(f"load: {name!r} has shape {shape} in {path}, the target "
                       f"{tuple(wanted.shape)}.")
    out.append(leaf)
  return treedef.unflatten(out)


def load(path, target: Any = None) -> Any:
  """Reads a file written by :func:`save`.

  Without ``target``: the tree that was saved (dicts with their str / int
  keys, lists, tuples, nnx States and Variables...), with ClusteredArray
  leaves where it was clustered (apply ``dequantize``); raw leaves are numpy
  arrays (jax PRNG keys for saved keys). Version 1 files give nested dicts.

  With ``target`` (any pytree, e.g. ``nnx.state(model, nnx.Param)`` or the
  params it was saved from; leaves may be arrays or ShapeDtypeStructs): the
  saved leaves placed into ``target``'s structure, matched by key path, as
  orbax restores. Every target leaf must be in the file with its shape; file
  entries the target has no place for are left out.
  """
  data = pathlib.Path(path).read_bytes()
  if len(data) < len(MAGIC) + 6 + 32 or not data.startswith(MAGIC):
    raise CorruptFileError(f"{path} is not a gkq_jax compressed file (bad magic or too short).")
  version, header_len = struct.unpack("<HI", data[len(MAGIC):len(MAGIC) + 6])
  if version > FORMAT_VERSION:
    raise CorruptFileError(f"{path} has format version {version}; this gkq_jax reads up to "
                           f"{FORMAT_VERSION}. Upgrade gkq_jax to load it.")
  body, digest = data[:-32], data[-32:]
  if hashlib.sha256(body).digest() != digest:
    raise CorruptFileError(f"{path} is truncated or corrupted (checksum mismatch); "
                           "write it again from the run's checkpoints.")
  start = len(MAGIC) + 6
  header = json.loads(zlib.decompress(body[start:start + header_len]))
  base = start + header_len

  def section(span):
    return body[base + span[0]:base + span[0] + span[1]]

  leaves = [_leaf_from_entry(entry, section) for entry in header["entries"]]
  if version < 2:
    tree = _nested_by_path(header["entries"], leaves)
  else:
    tree = _rebuild(header["tree"], leaves, _variable_types())
  if target is None:
    return tree
  return _restore_into(target, tree, path, by_string=version < 2)
