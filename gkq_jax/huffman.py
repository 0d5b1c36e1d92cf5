"""Canonical Huffman coding of integer symbols, vectorised with numpy.

Code lengths are limited to 16 bits (frequencies are flattened until they
fit) so that decoding is one table lookup per symbol. The stream records the
bit offset of every ``SYNC``-th symbol, which lets all those chunks be decoded
side by side: ~N / SYNC array operations instead of N Python steps.
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_CODE_BITS = 16
SYNC = 1024


def code_lengths(freqs: np.ndarray) -> np.ndarray:
  """Huffman code length of every symbol (0 for symbols that never occur)."""
  freqs = np.asarray(freqs, np.int64)
  used = np.flatnonzero(freqs)
  lengths = np.zeros(freqs.size, np.uint8)
  if used.size == 0:  # an empty stream (e.g. the gaps of a leaf pruned to nothing)
    return lengths
  if used.size == 1:
    lengths[used] = 1
    return lengths
  f = freqs[used].astype(np.float64)
  n = used.size
  while True:
    parent = np.zeros(2 * n - 1, np.int64)
    heap = [(w, i) for i, w in enumerate(f)]
    heapq.heapify(heap)
    node = n
    while len(heap) > 1:
      w1, a = heapq.heappop(heap)
      w2, b = heapq.heappop(heap)
      parent[a] = parent[b] = node
      heapq.heappush(heap, (w1 + w2, node))
      node += 1
    depth = np.zeros(2 * n - 1, np.int64)
    for i in range(2 * n - 3, -1, -1):  # parents are created after children
      depth[i] = depth[parent[i]] + 1
    if depth[:n].max() <= MAX_CODE_BITS:
      lengths[used] = depth[:n]
      return lengths
    f = np.maximum(f, f.sum() / 2 ** (MAX_CODE_BITS - 2))  # flatten the rare tail


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
  codes = np.zeros(lengths.size, np.uint32)
  code, prev = 0, 0
  for sym in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
    code <<= int(lengths[sym]) - prev
    codes[sym] = code
    code += 1
    prev = int(lengths[sym])
  return codes


def pack(codes: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
  """Concatenates variable-length big-endian codes; returns (bytes, bit count)."""
  lengths = lengths.astype(np.int64)
  ends = np.cumsum(lengths)
  total = int(ends[-1]) if ends.size else 0
  starts = ends - lengths
  bits = np.zeros(total, np.uint8)
  for j in range(int(lengths.max()) if lengths.size else 0):
    sel = lengths > j
    bits[starts[sel] + j] = (codes[sel] >> (lengths[sel] - 1 - j).astype(np.uint32)) & 1
  return np.packbits(bits).tobytes(), total


def encode(symbols: np.ndarray, alphabet: int) -> dict:
  """Huffman-codes ``symbols`` (ints in [0, alphabet)); returns the stream's parts."""
  symbols = np.asarray(symbols, np.int64).reshape(-1)
  lengths = code_lengths(np.bincount(symbols, minlength=alphabet))
  codes = canonical_codes(lengths)
  data, nbits = pack(codes[symbols], lengths[symbols])
  offsets = np.concatenate([[0], np.cumsum(lengths[symbols].astype(np.int64))])[::SYNC][
      :(symbols.size + SYNC - 1) // SYNC]
  if offsets.size and offsets[-1] >= 2 ** 32:
    raise ValueError("a Huffman stream of more than 4 Gbit: split the array.")
  return {"lengths": lengths, "sync": offsets.astype(np.uint32), "data": data,
          "count": int(symbols.size), "nbits": nbits}


def decode(lengths: np.ndarray, sync: np.ndarray, data: bytes, count: int) -> np.ndarray:
  lengths = np.asarray(lengths, np.int64)
  if count == 0:
    return np.zeros(0, np.int64)
  codes = canonical_codes(lengths)
  width = int(lengths.max())
  table_sym = np.zeros(1 << width, np.int64)
  table_len = np.zeros(1 << width, np.int64)
  for sym in np.flatnonzero(lengths):
    shift = width - int(lengths[sym])
    lo = int(codes[sym]) << shift
    table_sym[lo:lo + (1 << shift)] = sym
    table_len[lo:lo + (1 << shift)] = lengths[sym]
  buf = np.frombuffer(data + b"\0\0\0\0", np.uint8).astype(np.int64)
  pos = np.asarray(sync, np.int64).copy()
  out = np.zeros(pos.size * SYNC, np.int64)
  for t in range(SYNC):
    byte = np.minimum(pos >> 3, buf.size - 3)  # chunks past the end decode junk, cut below
    window = (buf[byte] << 16 | buf[byte + 1] << 8 | buf[byte + 2]) >> (8 - (pos & 7))
    window = (window >> (16 - width)) & ((1 << width) - 1)
    out[t::SYNC] = table_sym[window]
    pos = pos + table_len[window]
  return out[:count]


def nbytes(stream: dict) -> int:
  """Bytes the stream takes in a file: code lengths, sync offsets, payload."""
  return stream["lengths"].size + 4 * stream["sync"].size + len(stream["data"])
