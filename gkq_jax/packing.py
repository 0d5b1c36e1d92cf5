"""Cluster indices packed at their bit width: the weights a compressed model runs from.

A :class:`PackedArray` holds a :class:`ClusteredArray`'s codebook and its
indices packed into bytes, ``bits`` bits per index (``bits = ceil(log2 K)`` by
default). It is a pytree (``jax.device_put``, sharding, orbax checkpoints) and
:func:`pack_indices` / :func:`unpack_indices` are pure functions that jit.

Layout. The indices are viewed as a matrix of R rows and N columns: N is the
last axis (a kernel's output channels), R the product of the others (its
contracting axes). With 1 to 4 bits, 8 indices make one word of ``bits`` bytes:
word g of column n holds rows ``g, g + G, ..., g + 7G`` (G = ceil(R / 8)), index j
at bits ``[j * bits, (j + 1) * bits)``, little-endian. Unpacking a row of words
therefore yields 8 contiguous slabs of rows, which a matmul can consume against
8 slices of its input with no shuffle (the lookup-table kernel does). With 5 to
8 bits every index takes one byte, with 9 to 16 two. The packed bytes are a
``uint8`` array of shape (bytes per word, G, N).

A stack of layers (a ClusteredArray with ``stacked`` leading axes, an
``nn.scan`` kernel) is packed layer by layer: the bytes are (*stack, bytes per
word, G, N), the codebook (*stack, ...) with each layer's own codebook, and
``index_shape`` one layer's. Slicing the leading axis of both arrays (as
``lax.scan`` does to the variables of a scanned layer) gives the PackedArray
of one layer, which is why the stack's depth is read off the arrays rather
than stored.

Dense-and-sparse. A ClusteredArray's sparse part (:class:`SparseOutliers`,
weights kept exactly) travels as the PackedArray's ``sparse``; dequantizing
writes those weights over the looked-up ones, so the packed model computes
what the dense dequantized one does (:func:`gkq_jax.lut_matmul` adds them as a
sparse correction to its product instead). A stack's part is laid out layer by
layer, like its bytes: positions within the layer, (*stack, n) with n the most
any layer keeps, the shorter layers padded with the position one past the
layer's end (ignored), so slicing the leading axis gives one layer's part.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gkq_jax._clustering import is_traced
from gkq_jax._paths import map_with_paths
from gkq_jax.clustered import ClusteredArray, SparseOutliers, channel_view, is_clustered

MAX_BITS = 16
_SLABS = 8  # indices per word at 1..4 bits


def bits_for(num_clusters: int) -> int:
  """The fewest bits that address ``num_clusters`` values (at least 1)."""
  return max(1, math.ceil(math.log2(max(int(num_clusters), 1))))


@dataclasses.dataclass(frozen=True)
class _Layout:
  rows: int
  columns: int
  per_word: int  # indices in one word
  word_bytes: int
  words: int  # words per column

  @property
  def field(self) -> int:  # bit offset between neighbouring indices of a word
    return 0 if self.per_word == 1 else 8 * self.word_bytes // self.per_word

  @property
  def packed_shape(self) -> tuple:
    return (self.word_bytes, self.words, self.columns)


def _layout(shape, bits: int) -> _Layout:
  if not 1 <= bits <= MAX_BITS:
    raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}.")
  shape = tuple(int(s) for s in shape)
  columns = shape[-1] if len(shape) >= 2 else 1
  rows = int(np.prod(shape)) // max(columns, 1) if columns else 0
  per_word = _SLABS if bits <= 4 else 1
  word_bytes = bits if bits <= 4 else (1 if bits <= 8 else 2)
  return _Layout(rows, columns, per_word, word_bytes, -(-rows // per_word))


def _check_indices(indices, bits: int) -> None:
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"indices must be integers, got {indices.dtype}.")
  if is_traced(indices) or indices.size == 0:
    return
  a = np.asarray(indices)
  low, high = int(a.min()), int(a.max())
  if low < 0 or high >= 2 ** bits:
    raise ValueError(f"indices span {low}..{high}, which does not fit in bits={bits} "
                     f"(0..{2 ** bits - 1}); ask for bits >= {bits_for(high + 1)}.")


def pack_indices(indices, bits: int) -> jax.Array:
  """Packs integer ``indices`` (any shape) at ``bits`` bits each; see the module docstring.

  Returns a ``uint8`` array of shape (bytes per word, words, columns). Pure and
  jit-able with ``bits`` static; outside jit the indices are checked to fit.
  """
  indices = jnp.asarray(indices)
  _check_indices(indices, bits)
  return _pack(indices, bits)


@functools.partial(jax.jit, static_argnums=1)
def _pack(indices, bits):
  lay = _layout(indices.shape, bits)
  idx = indices.reshape(lay.rows, lay.columns).astype(jnp.uint32)
  idx = jnp.pad(idx, ((0, lay.words * lay.per_word - lay.rows), (0, 0)))
  slabs = idx.reshape(lay.per_word, lay.words, lay.columns)
  shifts = (jnp.arange(lay.per_word, dtype=jnp.uint32) * lay.field)[:, None, None]
  # The fields of a word are disjoint, so their sum is their bitwise or.
  word = jnp.sum(slabs << shifts, axis=0, dtype=jnp.uint32)
  planes = [(word >> (8 * b)) & 0xFF for b in range(lay.word_bytes)]
  return jnp.stack(planes).astype(jnp.uint8)


def unpack_indices(packed, bits: int, shape, dtype=jnp.uint8) -> jax.Array:
  """Inverse of :func:`pack_indices`: the indices of ``shape`` as ``dtype``."""
  lay = _layout(shape, bits)
  packed = jnp.asarray(packed)
  if tuple(packed.shape) != lay.packed_shape or packed.dtype != jnp.uint8:
    raise ValueError(f"packed bytes have shape {tuple(packed.shape)} and dtype {packed.dtype}; "
                     f"indices of shape {tuple(shape)} at {bits} bits need uint8 "
                     f"{lay.packed_shape}.")
  return _unpack(packed, bits, tuple(int(s) for s in shape), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unpack(packed, bits, shape, dtype):
  lay = _layout(shape, bits)
  word = packed[0].astype(jnp.uint32)
  for b in range(1, lay.word_bytes):
    word = word | (packed[b].astype(jnp.uint32) << (8 * b))
  shifts = (jnp.arange(lay.per_word, dtype=jnp.uint32) * lay.field)[:, None, None]
  values = (word[None] >> shifts) & jnp.uint32(2 ** bits - 1)
  values = values.reshape(lay.per_word * lay.words, lay.columns)[:lay.rows]
  return values.reshape(shape).astype(dtype)


def indices_at(packed: "PackedArray", rows, columns) -> jax.Array:
  """The indices at (row, column) of a one-layer PackedArray's packed matrix
  (for a 2-D weight: its own rows and columns), read straight from the bytes
  (uint32; pure and jit-able). For a few entries, without unpacking the rest."""
  matrix = _matrix_shape(packed.index_shape, packed.codebook, packed.vector_shape)
  lay = _layout(matrix, packed.bits)
  rows = jnp.asarray(rows, jnp.int32)
  columns = jnp.asarray(columns, jnp.int32)
  slab, word_row = rows // lay.words, rows % lay.words
  word = jnp.zeros(rows.shape, jnp.uint32)
  for b in range(lay.word_bytes):
    word = word | (packed.packed[b, word_row, columns].astype(jnp.uint32) << (8 * b))
  shift = (slab * lay.field).astype(jnp.uint32)
  return (word >> shift) & jnp.uint32(2 ** packed.bits - 1)


def _static_fields() -> tuple[str, ...]:
  """ClusteredArray's metadata fields (not pytree children), carried through packing as they
  are; ``stacked`` is read off the packed arrays instead (see the module docstring)."""
  fields = dataclasses.fields(ClusteredArray)
  children = tuple(f.name for f in fields if f.metadata.get("pytree_node", True))
  if children != ("codebook", "indices", "sparse"):
    raise TypeError(f"packing knows ClusteredArray(codebook, indices, sparse), found {children}.")
  return tuple(f.name for f in fields
               if not f.metadata.get("pytree_node", True) and f.name != "stacked")


@flax.struct.dataclass
class PackedArray:
  """A :class:`ClusteredArray` whose indices are packed at ``bits`` bits each.

  ``codebook`` is the ClusteredArray's, ``packed`` the uint8 bytes laid out as
  the module docstring says, ``index_shape`` the shape of the indices (of one
  layer, for a stack), ``clustered`` the ClusteredArray's metadata fields
  as (name, value) pairs and ``sparse`` its weights kept exactly (None: none;
  laid out as the module docstring says).
  """

  codebook: jax.Array
  packed: jax.Array
  index_shape: tuple = flax.struct.field(pytree_node=False)
  bits: int = flax.struct.field(pytree_node=False)
  clustered: tuple = flax.struct.field(pytree_node=False, default=())
  sparse: SparseOutliers | None = None

  @property
  def num_clusters(self) -> int:
    return self.codebook.shape[0] if self.vector_shape else self.codebook.shape[-1]

  @property
  def vector_shape(self):
    return dict(self.clustered).get("vector_shape")

  @property
  def stacked(self) -> int:
    """Leading axes of the arrays that stack layers (0: one layer)."""
    return self.packed.ndim - 3

  @property
  def shape(self) -> tuple:
    """Shape of the dense array (the ClusteredArray's, whatever its layout)."""
    if self.stacked:
      return tuple(self.packed.shape[:self.stacked]) + tuple(self.index_shape)
    spec = jax.ShapeDtypeStruct(tuple(self.index_shape), jnp.uint8)
    return tuple(ClusteredArray(self.codebook, spec, **dict(self.clustered)).shape)

  @property
  def dtype(self):
    return jnp.dtype(dict(self.clustered).get("dtype") or self.codebook.dtype)

  @property
  def nbytes(self) -> int:
    """Bytes of the codebook, the packed indices and the sparse part (int32
    positions and their values)."""
    sparse = 0
    if self.sparse is not None:
      sparse = self.sparse.positions.size * 4 + self.sparse.values.size * \
          self.sparse.values.dtype.itemsize
    return int(self.codebook.size * self.codebook.dtype.itemsize + self.packed.size + sparse)

  def indices(self) -> jax.Array:
    dtype = jnp.uint8 if self.num_clusters <= 256 else jnp.uint16
    matrix = _matrix_shape(self.index_shape, self.codebook, self.vector_shape)
    one = lambda p: unpack_indices(p, self.bits, matrix, dtype).reshape(  # noqa: E731
        self.index_shape)
    if not self.stacked:
      return one(self.packed)
    lead = tuple(self.packed.shape[:self.stacked])
    layers = self.packed.reshape((-1,) + self.packed.shape[self.stacked:])
    return jax.vmap(one)(layers).reshape(lead + tuple(self.index_shape))

  def to_clustered(self) -> ClusteredArray:
    """The ClusteredArray (a stack's sparse part back to positions in the whole
    array; under jit its padding stays, at the array's size, and is ignored)."""
    book = self.codebook
    sparse = self.sparse
    if self.stacked:  # (*stack, [R,] C, k) -> (layers x R, C, k)
      book = book.reshape((-1,) + book.shape[-2:])
      if sparse is not None:
        sparse = _sparse_from_layers(sparse, math.prod(self.index_shape),
                                     math.prod(self.shape))
    return ClusteredArray(book, self.indices(), **dict(self.clustered), stacked=self.stacked,
                          sparse=sparse)

  def dequantize(self) -> jax.Array:
    return self.to_clustered().dequantize()


def _sparse_to_layers(sparse: SparseOutliers, lead: tuple, layer_size: int, name: str):
  """A stack's sparse part as (*lead, n) positions within each layer (padded
  with ``layer_size``) and their values; see the module docstring."""
  if is_traced(sparse.positions, sparse.values):
    raise ValueError(f"{name}: a stacked leaf with a sparse part is packed layer by layer on "
                     "the host; call pack / pack_tree outside jax.jit.")
  layers = math.prod(lead)
  pos = np.asarray(sparse.positions).reshape(-1).astype(np.int64)
  values = np.asarray(sparse.values).reshape(-1)
  keep = pos < layers * layer_size
  pos, values = pos[keep], values[keep]
  order = np.argsort(pos, kind="stable")
  pos, values = pos[order], values[order]
  layer = pos // layer_size
  counts = np.bincount(layer, minlength=layers)
  width = int(counts.max(initial=0))
  local = np.full((layers, width), layer_size, np.int32)
  kept = np.zeros((layers, width), values.dtype)
  rank = np.arange(pos.size) - (np.cumsum(counts) - counts)[layer]
  local[layer, rank] = pos - layer * layer_size
  kept[layer, rank] = values
  return SparseOutliers(jnp.asarray(local.reshape(lead + (width,))),
                        jnp.asarray(kept.reshape(lead + (width,))))


def _sparse_from_layers(sparse: SparseOutliers, layer_size: int, total: int) -> SparseOutliers:
  """Inverse of :func:`_sparse_to_layers`: positions in the whole stacked array."""
  width = sparse.positions.shape[-1]
  local = jnp.asarray(sparse.positions, jnp.int32).reshape(-1, width)
  layer = jnp.arange(local.shape[0], dtype=jnp.int32)[:, None]
  pos = jnp.where(local < layer_size, local + layer * layer_size, total).reshape(-1)
  values = jnp.reshape(sparse.values, -1)
  if not is_traced(pos, values):  # the padding left out
    keep = np.asarray(pos) < total
    pos, values = pos[keep], values[keep]
  return SparseOutliers(pos.astype(jnp.int32), values)


def _matrix_shape(index_shape, codebook, vector_shape) -> tuple:
  """The (rows, columns) matrix the indices are packed as: the columns are the
  codebook's channels (so a weight sharded along its output features stays
  sharded in its packed bytes, whatever its number of axes), or the last axis
  for a codebook per layer and for vector codebooks."""
  channels = codebook.shape[-2] if vector_shape is None and codebook.ndim >= 2 else 1
  if channels <= 1 or len(index_shape) <= 2:
    return tuple(index_shape)
  try:
    return channel_view(index_shape, channels)
  except ValueError:  # codebooks per group of channels (the lookup-table kernel's layout)
    return tuple(index_shape)


def is_packed(x) -> bool:
  """True for a PackedArray leaf (an ``is_leaf`` for tree maps over packed trees)."""
  return isinstance(x, PackedArray)


def pack(clustered: ClusteredArray, bits: int | None = None, *, name: str = "array") -> PackedArray:
  """Packs one ClusteredArray; ``bits`` defaults to the fewest its codebook needs."""
  fields = _static_fields()
  k = clustered.num_clusters
  need = bits_for(k)
  if bits is None:
    bits = need
  if not 1 <= bits <= MAX_BITS:
    raise ValueError(f"{name}: bits must be in 1..{MAX_BITS}, got {bits}.")
  if bits < need:
    raise ValueError(f"{name} has {k} clusters, which need {need} bits; got bits={bits}. "
                     f"Pack with bits >= {need} (or None for the fewest).")
  indices = jnp.asarray(clustered.indices)
  meta = tuple((f, getattr(clustered, f)) for f in fields)
  if not clustered.stacked:
    matrix = _matrix_shape(indices.shape, clustered.codebook, clustered.vector_shape)
    return PackedArray(clustered.codebook, pack_indices(indices.reshape(matrix), bits),
                       tuple(indices.shape), bits, meta, sparse=clustered.sparse)
  lead, one = indices.shape[:clustered.stacked], indices.shape[clustered.stacked:]
  book = clustered.layer_codebooks()
  matrix = _matrix_shape(one, book, None)
  _check_indices(indices, bits)
  packed = jax.vmap(lambda i: _pack(i.reshape(matrix), bits))(indices.reshape((-1,) + one))
  sparse = clustered.sparse
  if sparse is not None:
    sparse = _sparse_to_layers(sparse, tuple(lead), math.prod(one), name)
  return PackedArray(book, packed.reshape(lead + packed.shape[1:]), tuple(one), bits, meta,
                     sparse=sparse)


def unpack(packed: PackedArray) -> ClusteredArray:
  return packed.to_clustered()


def pack_tree(tree: Any, bits: int | None = None) -> Any:
  """Replaces every ClusteredArray of ``tree`` by its :class:`PackedArray`.

  ``bits=None`` packs each leaf at the fewest bits its codebook needs; an int
  packs every leaf at that width, and a leaf whose clusters need more is an
  error naming it.
  """
  return map_with_paths(lambda path, x: pack(x, bits, name=path) if is_clustered(x) else x,
                        tree, is_leaf=is_clustered)


def unpack_tree(tree: Any) -> Any:
  """Replaces every PackedArray of ``tree`` by its ClusteredArray."""
  return jax.tree.map(lambda x: x.to_clustered() if is_packed(x) else x, tree, is_leaf=is_packed)


def dequantize_packed(tree: Any) -> Any:
  """Replaces every PackedArray (and ClusteredArray) of ``tree`` by its dense array."""
  leaf = lambda x: is_packed(x) or is_clustered(x)  # noqa: E731
  return jax.tree.map(lambda x: x.dequantize() if leaf(x) else x, tree, is_leaf=leaf)
