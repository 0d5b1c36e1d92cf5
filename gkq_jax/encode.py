"""The compressed file: codebooks + Huffman-coded indices, with a checksum.

Layout: ``MAGIC | u16 version | u32 header length | zlib(JSON header) |
sections | sha256 of everything before it``. Each leaf of the params tree is one entry:

  * ``raw``: the array's bytes (biases, norms, anything not clustered);
  * ``clustered``: the float32 codebook, and the indices coded the smallest of
    three ways: fixed width, Huffman, or (for pruned leaves) Deep
    Compression's relative index: the gaps between non-zero weights (with
    filler entries where a gap overflows its bits) and their indices, both
    Huffman-coded.

Loading gives the same ClusteredArrays back, so the dequantized params, and
the logits computed from them, are bit-identical to the in-memory model.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import struct
import zlib
from typing import Any

import jax
import numpy as np

from gkq_jax import huffman
from gkq_jax._paths import named_leaves
from gkq_jax.quantize import ClusteredArray, is_clustered

MAGIC = b"GKQJAX\0"
FORMAT_VERSION = 1


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
    for gap_bits in range(2, 9):
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


def save(path, tree: Any) -> tuple[int, dict]:
  """Writes a (partly) quantized params tree.

  Returns the file size in bytes and, per leaf path, the bytes its sections
  take and how its indices were coded.
  """
  sections, entries, sizes = _Sections(), [], {}
  for name, leaf in named_leaves(tree, is_leaf=is_clustered):
    before = sections.buffer.tell()
    if is_clustered(leaf):
      book = np.asarray(leaf.codebook, np.float32)
      idx = np.asarray(leaf.indices).reshape(-1).astype(np.int64)
      k = book.shape[0] if leaf.vector_shape else book.shape[-1]
      entries.append({
          "path": name, "kind": "clustered", "index_shape": list(leaf.indices.shape),
          "index_dtype": str(np.asarray(leaf.indices).dtype),
          "codebook_shape": list(book.shape), "codebook": sections.add(book.tobytes()),
          "vector_shape": list(leaf.vector_shape) if leaf.vector_shape else None,
          "vector_axis": int(leaf.vector_axis),
          "pinned_zero": bool(leaf.pinned_zero),
          "indices": _encode_indices(idx, k, leaf.pinned_zero and leaf.vector_shape is None,
                                     sections)})
    else:
      array = np.asarray(leaf)
      entries.append({"path": name, "kind": "raw", "dtype": str(array.dtype),
                      "shape": list(array.shape), "data": sections.add(array.tobytes())})
    coding = entries[-1]["indices"]["coding"] if entries[-1]["kind"] == "clustered" else "raw"
    sizes[name] = {"bytes": sections.buffer.tell() - before, "coding": coding}
  header = zlib.compress(json.dumps({"entries": entries}, separators=(",", ":")).encode(), 9)
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


def load(path) -> dict:
  """Reads a file written by :func:`save` into a nested dict of params
  (ClusteredArray leaves for clustered ones; apply ``dequantize``)."""
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

  tree: dict = {}
  for entry in header["entries"]:
    if entry["kind"] == "raw":
      leaf = np.frombuffer(section(entry["data"]), entry["dtype"]).reshape(entry["shape"])
    else:
      book = np.frombuffer(section(entry["codebook"]), np.float32).reshape(entry["codebook_shape"])
      n = int(np.prod(entry["index_shape"]))
      idx = _decode_indices(entry["indices"], n, section)
      vector = tuple(entry["vector_shape"]) if entry["vector_shape"] else None
      leaf = ClusteredArray(jax.numpy.asarray(book),
                            jax.numpy.asarray(idx.astype(entry["index_dtype"]).reshape(
                                entry["index_shape"])), vector, entry["pinned_zero"],
                            entry.get("vector_axis", 0))
    node = tree
    keys = entry["path"].split("/")
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = leaf
  return tree
