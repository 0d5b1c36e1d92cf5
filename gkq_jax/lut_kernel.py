"""Lookup-table matmul in Pallas: ``x @ W`` with W given as packed 1-4 bit indices and codebooks.

The kernel reads W's packed bytes (``bits / 8`` bytes per weight) and its
codebooks, and turns indices into values on chip: by default a tree of
``2**bits - 1`` selects over the codebook entries of each output channel, one
level per index bit, so no dense weight ever sits in memory; ``lookup="gather"``
instead loads each value from the tile's codebook (which stays in cache). At batch 1 a
matmul is bound by the bytes it reads, which is where packed 4-bit weights
(4x fewer bytes than bf16) gain; FLUTE and SqueezeLLM's kernels do the same.

W is laid out as :mod:`gkq_jax.packing` packs a kernel of shape (R, N): words of
8 indices from rows ``g, g + G, ..., g + 7G``. The kernel views x (M, R) as
8 slabs ``x[:, j*G:(j+1)*G]`` and accumulates ``slab_j @ W_j`` in float32 for the
8 slabs of every word chunk, so nothing is shuffled.

Grid: (M blocks, N blocks, K splits). Each program loops over its share of the
words in chunks of ``block_words`` words (8 x block_words rows); K splits give a
batch-1 product enough programs to fill a GPU, and their partial sums are added
after the call. Shapes the kernel takes: ceil(R / 8) a multiple of 16 (e.g. R a
multiple of 128), N a multiple of 16, 1 to 4 bits, a codebook per layer, per channel or
per group of channels; :func:`lut_unsupported` says why anything else is not.

Dense-and-sparse weights (a PackedArray with a ``sparse`` part): the kernel
multiplies the clustered weight as it is, and the kept weights are added as a
sparse correction, ``x[:, r] * (value - looked-up value)`` into column n for
each kept weight (r, n), in float32 before the result is cast, so the product
is ``x @ dequantize(w)`` as the dense path computes it (to rounding).

Runs compiled on a GPU (Triton lowering) and in Pallas interpret mode on CPU,
where it is slow and serves tests; the CPU forward uses the XLA path instead
(:mod:`gkq_jax.flax_runtime`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gkq_jax import packing

_SLABS = 8
_MIN_TILE = 16  # Triton's dot needs every dimension >= 16
_TARGET_PROGRAMS = 256  # about two waves on a 132-SM GPU
LOOKUPS = ("select", "gather")


def lut_unsupported(w: packing.PackedArray) -> str | None:
  """Why ``w`` cannot run through the kernel (None when it can)."""
  if w.vector_shape is not None:
    return "vector codebooks (granularity='vector') have no lookup-table kernel"
  if len(w.index_shape) != 2:
    return f"the kernel multiplies matrices; this weight has shape {w.shape}"
  if w.codebook.ndim != 2:
    return "codebooks per group of input rows (quantize's group_size) have no lookup-table kernel"
  if w.bits > 4:
    return f"{w.bits}-bit indices: the kernel takes 1 to 4 bits"
  rows, cols = w.index_shape
  words = w.packed.shape[1]
  if words % _MIN_TILE:
    return (f"{rows} input rows make {words} words of 8; the kernel needs a multiple of "
            f"{_MIN_TILE} words (rows in steps of {8 * _MIN_TILE})")
  if cols % _MIN_TILE:
    return f"{cols} output channels: the kernel needs a multiple of {_MIN_TILE}"
  groups = w.codebook.shape[0]
  if cols % groups:
    return f"{groups} codebooks do not split {cols} output channels evenly"
  return None


def _dense(w: packing.PackedArray) -> jax.Array:
  """The (R, N) weight; codebook row c serves channels c*N/C .. (c+1)*N/C - 1."""
  idx = w.indices().astype(jnp.int32)
  groups, n = w.codebook.shape[0], w.index_shape[-1]
  if groups in (1, n):
    return w.dequantize()
  dense = w.codebook[(jnp.arange(n) // (n // groups))[None, :], idx]
  return dense if w.sparse is None else w.sparse.apply(dense)


def _sparse_correction(x, w: packing.PackedArray) -> jax.Array:
  """(M, N) float32: what the kept weights add to x @ (the clustered weight),
  x (M, R) in the dtype the kernel computes in."""
  rows, n = w.index_shape
  pos = jnp.reshape(w.sparse.positions, -1).astype(jnp.int32)
  valid = pos < rows * n
  pos = jnp.where(valid, pos, 0)
  r, c = pos // n, pos % n
  idx = packing.indices_at(w, r, c).astype(jnp.int32)
  groups = w.codebook.shape[0]
  looked_up = w.codebook[c // (n // groups), idx]
  kept = jnp.reshape(w.sparse.values, -1)
  as_x = lambda v: v.astype(x.dtype).astype(jnp.float32)  # noqa: E731
  delta = jnp.where(valid, as_x(kept) - as_x(looked_up), 0.0)
  return jnp.zeros((x.shape[0], n), jnp.float32).at[:, c].add(
      x[:, r].astype(jnp.float32) * delta[None, :])


def lut_matmul_reference(x, w: packing.PackedArray) -> jax.Array:
  """Dequantize-then-dot: what :func:`lut_matmul` computes, in plain XLA."""
  x = jnp.asarray(x)
  return jnp.matmul(x, _dense(w).astype(x.dtype), preferred_element_type=jnp.float32
                    ).astype(x.dtype)


def _largest_tile(n: int, cap: int) -> int:
  tile = cap
  while tile > _MIN_TILE and n % tile:
    tile //= 2
  return tile


def _auto_splits(chunks: int, programs: int) -> int:
  """The fewest K splits (a divisor of the chunk count) that give enough programs."""
  for s in range(1, chunks + 1):
    if chunks % s == 0 and programs * s >= _TARGET_PROGRAMS:
      return s
  return chunks


def _select(entries, idx, bits: int):
  """entries[idx] for 2**bits candidate rows, one select per node of a binary tree."""
  values = list(entries) + [entries[-1]] * (2 ** bits - len(entries))
  for b in range(bits):
    bit = ((idx >> b) & 1) == 1
    values = [jnp.where(bit, values[2 * i + 1], values[2 * i]) for i in range(len(values) // 2)]
  return jnp.broadcast_to(values[0], idx.shape)


def _kernel(x_ref, w_ref, book_ref, out_ref, *, bits, word_bytes, block_words, chunks, lookup):
  # x_ref (8, tm, words / splits); w_ref (word_bytes, words / splits, tn);
  # book_ref (k, tn); out_ref (tm, tn): this split's partial sum.
  tn = out_ref.shape[-1]
  if lookup == "select":
    entries = [book_ref[c, :][None, :] for c in range(book_ref.shape[0])]
    values = lambda idx: _select(entries, idx, bits)  # noqa: E731
  else:  # one load per weight from the tile's codebook, which stays in cache
    columns = lax.broadcasted_iota(jnp.int32, (block_words, tn), 1)
    values = lambda idx: book_ref[(idx & (2 ** bits - 1)).astype(jnp.int32), columns]  # noqa: E731

  def chunk(c, acc):
    rows = pl.ds(pl.multiple_of(c * block_words, block_words), block_words)
    word = w_ref[0, rows, :].astype(jnp.uint32)
    for b in range(1, word_bytes):
      word = word | (w_ref[b, rows, :].astype(jnp.uint32) << (8 * b))
    for j in range(_SLABS):
      w = values(word >> (bits * j))
      acc = acc + jnp.dot(x_ref[j, :, rows], w, preferred_element_type=jnp.float32)
    return acc

  out_ref[...] = lax.fori_loop(0, chunks, chunk, jnp.zeros(out_ref.shape, jnp.float32))


@functools.partial(jax.jit, static_argnames=("bits", "rows", "block_n", "block_words", "splits",
                                             "lookup", "interpret"))
def _lut_matmul(x, codebook, packed, *, bits, rows, block_n, block_words, splits, lookup,
                interpret):
  m = x.shape[0]
  word_bytes, words, n = packed.shape
  tm = min(64, max(_MIN_TILE, pl.next_power_of_2(m)))
  m_pad = pl.cdiv(m, tm) * tm
  # Row r of the weight is slab r // words, word r % words.
  x = jnp.pad(x, ((0, m_pad - m), (0, _SLABS * words - rows)))
  x3 = x.reshape(m_pad, _SLABS, words).transpose(1, 0, 2)
  book = jnp.repeat(codebook, n // codebook.shape[0], axis=0).T.astype(x.dtype)  # (k, n)
  k = book.shape[0]
  tn = block_n
  chunks = words // block_words
  programs = (m_pad // tm) * (n // tn)
  splits = splits or _auto_splits(chunks, programs)
  share = words // splits
  kernel = functools.partial(_kernel, bits=bits, word_bytes=word_bytes, block_words=block_words,
                             chunks=share // block_words, lookup=lookup)
  partial = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((splits, m_pad, n), jnp.float32),
      grid=(m_pad // tm, n // tn, splits),
      in_specs=[pl.BlockSpec((_SLABS, tm, share), lambda i, j, s: (0, i, s)),
                pl.BlockSpec((word_bytes, share, tn), lambda i, j, s: (0, s, j)),
                pl.BlockSpec((k, tn), lambda i, j, s: (0, j))],
      out_specs=pl.BlockSpec((None, tm, tn), lambda i, j, s: (s, i, j)),
      interpret=interpret,
      name="gkq_lut_matmul",
  )(x3, packed, book)
  return partial.sum(axis=0)[:m]  # float32


def lut_matmul(x, w: packing.PackedArray, *, interpret: bool | None = None,
               block_n: int | None = None, block_words: int | None = None,
               splits: int | None = None, lookup: str = "select") -> jax.Array:
  """``x @ dequantize(w)`` read from ``w``'s packed bytes (float32 accumulation;
  a sparse part of kept weights is added as a sparse correction, see the
  module docstring).

  Args:
    x: (..., R) bfloat16 or float32; the result has x's dtype and shape (..., N).
    w: a packed (R, N) kernel with 1-4 bit indices and a codebook per layer,
      per output channel or per group of channels (``codebook`` (C, k), C
      dividing N; group c holds channels ``c*N/C .. (c+1)*N/C - 1``).
    interpret: run in Pallas interpret mode; default: on any backend but GPU.
    block_n: output channels per program (default: up to 128).
    block_words: words (8 rows each) per step of a program's loop (default 32 or 16).
    splits: programs sharing one output tile's K range (default: enough
      programs to fill a GPU at batch 1).
    lookup: how indices become values: "select" (a tree of ``2**bits - 1``
      selects over the tile's codebook entries, held in registers) or
      "gather" (one load per weight from the tile's codebook, which stays in
      cache: fewer instructions, as FLUTE's shared-memory table).

  Raises:
    ValueError: for weights the kernel does not take (see :func:`lut_unsupported`);
      run those with :func:`lut_matmul_reference` or the XLA path.
  """
  if not isinstance(w, packing.PackedArray):
    raise TypeError(f"w must be a PackedArray (gkq_jax.pack), got {type(w).__name__}.")
  reason = lut_unsupported(w)
  if reason:
    raise ValueError(f"lut_matmul cannot run this weight: {reason}.")
  x = jnp.asarray(x)
  rows, n = w.index_shape
  if x.shape[-1] != rows:
    raise ValueError(f"x has {x.shape[-1]} features, the weight {rows} input rows.")
  if x.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"x must be bfloat16 or float32, got {x.dtype}.")
  if lookup not in LOOKUPS:
    raise ValueError(f"lookup={lookup!r} is not one of {LOOKUPS}.")
  words = w.packed.shape[1]
  block_n = block_n or _largest_tile(n, 128)
  block_words = block_words or _largest_tile(words, 32)
  if n % block_n or words % block_words or (splits and (words // block_words) % splits):
    raise ValueError(f"block_n={block_n} must divide {n} channels, block_words={block_words} "
                     f"the {words} words, and splits={splits} the {words // block_words} chunks.")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  lead = x.shape[:-1]
  x2 = x.reshape(-1, rows)
  y = _lut_matmul(x2, w.codebook, w.packed, bits=w.bits, rows=rows,
                  block_n=block_n, block_words=block_words, splits=splits, lookup=lookup,
                  interpret=bool(interpret))
  if w.sparse is not None:
    y = y + _sparse_correction(x2, w)
  return y.astype(x.dtype).reshape(lead + (n,))
