"""The weight-shared array: codebook + integer indices, and its dense form.

Every algorithm of the library (k-means, ECSQ, uniform grids, QAT) produces a
:class:`ClusteredArray`; fine-tuning, packing, the file and the runtime read
it. It lives apart from the algorithms so that none of them imports another to
reach it.

Scalar layouts. The weight is read as a matrix of ``size // C`` input rows and
``C`` output channels, ``C`` the product of its trailing *channel axes* (the
last axis of a Dense or Conv kernel, all of ``features`` of a DenseGeneral /
LinearGeneral kernel such as attention's (d, heads, head_dim) q projection).
``codebook`` is (C, k) with one row per channel (C = 1: one codebook for the
whole weight), or (R, C, k) where codebook [r, c] serves input rows
``r * F / R .. (r + 1) * F / R - 1`` of channel c (F = size // C): per grouped
channel, and a stack of layers (the ``stacked`` leading axes of an ``nn.scan``
kernel), where every layer's slice has its own R / L rows.

Vector layout (``vector_shape`` set): ``codebook`` is (k, prod(vector_shape)),
``indices`` has the non-vector axes, and the vector axes sit at ``vector_axis``
of the original (0: leading, whole filters; the last spatial axis for kernel
rows).

The codebook is float32; ``dtype`` is the dense array's (a bfloat16 kernel
dequantizes to bfloat16).

Dense-and-sparse (SqueezeLLM): ``sparse``, when set, is a
:class:`SparseOutliers`, a few weights kept exactly beside the clustered ones
(``quantize(..., sparse_fraction=...)``). Its ``positions`` index the dense
array in C order; ``dequantize`` overwrites those positions with ``values``.
The indices at those positions are never read (quantize gives them 0, the
file stores them as 0). The overwrite is independent of the layout, so every
layout dequantizes with a sparse part; quantize makes one for the scalar
layouts only.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gkq_jax import _vectors
from gkq_jax._paths import named_leaves


def channel_view(shape: tuple, channels: int) -> tuple[int, int]:
  """(input rows, channels) of a weight of ``shape`` read with ``channels`` columns.

  ``channels`` must be the product of some trailing axes of ``shape``, so that
  the weight's C-order layout *is* that matrix.
  """
  shape = tuple(int(s) for s in shape)
  size = math.prod(shape)
  if channels == 1:
    return size, 1
  product = 1
  for axis in reversed(shape):
    product *= axis
    if product == channels:
      return size // channels, channels
  raise ValueError(f"a codebook of {channels} channels does not match the trailing axes of a "
                   f"weight of shape {shape}; per-channel codebooks serve the product of the "
                   "last axes (the layer's output features).")


@flax.struct.dataclass
class SparseOutliers:
  """Weights kept exactly beside a :class:`ClusteredArray` (the "sparse" of
  SqueezeLLM's dense-and-sparse decomposition).

  ``positions``: int32 (n,), flat C-order positions into the dense array,
  sorted and distinct; ``values``: (n,), their exact values (in the dense
  array's dtype as :func:`gkq_jax.quantize` makes them; any float dtype is
  cast to the dense dtype when applied). Positions at or past the array's
  size are ignored (the padding of a packed stack's layers read under jit).
  """

  positions: jax.Array
  values: jax.Array

  @property
  def count(self) -> int:
    """How many weights are kept (padding included, where there is any)."""
    return int(math.prod(self.positions.shape))

  def apply(self, dense: jax.Array) -> jax.Array:
    """``dense`` with the kept weights written in at their positions (pure, jit-able)."""
    flat = jnp.reshape(dense, -1).at[jnp.reshape(self.positions, -1)].set(
        jnp.reshape(self.values, -1).astype(dense.dtype), mode="drop")
    return flat.reshape(jnp.shape(dense))

  def mask(self, shape) -> jax.Array:
    """A bool array of ``shape``, True at the kept weights."""
    size = math.prod(tuple(shape))
    return jnp.zeros(size, bool).at[jnp.reshape(self.positions, -1)].set(
        True, mode="drop").reshape(shape)

  def take(self, dense) -> "SparseOutliers":
    """The same positions with their values read from ``dense`` (kept in this
    part's value dtype); positions past the end read 0."""
    flat = jnp.reshape(jnp.asarray(dense), -1)
    pos = jnp.reshape(self.positions, -1)
    values = jnp.take(flat, pos, mode="fill", fill_value=0)
    return self.replace(values=values.astype(self.values.dtype).reshape(self.values.shape))


@flax.struct.dataclass
class ClusteredArray:
  """A weight-shared array; see the module docstring for its layouts."""

  codebook: jax.Array
  indices: jax.Array
  vector_shape: tuple = flax.struct.field(pytree_node=False, default=None)
  # Index 0 is an exact zero reserved for pruned weights (codebook[..., 0] == 0).
  pinned_zero: bool = flax.struct.field(pytree_node=False, default=False)
  vector_axis: int = flax.struct.field(pytree_node=False, default=0)
  dtype: np.dtype = flax.struct.field(pytree_node=False, default=np.dtype("float32"))
  # Leading axes that stack layers (nn.scan): each slice has its own codebook rows.
  stacked: int = flax.struct.field(pytree_node=False, default=0)
  # Weights kept exactly (dense-and-sparse), or None: see the module docstring.
  sparse: SparseOutliers | None = None

  @property
  def shape(self):
    if self.vector_shape is None:
      return self.indices.shape
    rest = tuple(self.indices.shape)
    return rest[:self.vector_axis] + tuple(self.vector_shape) + rest[self.vector_axis:]

  @property
  def num_clusters(self) -> int:
    return self.codebook.shape[0] if self.vector_shape else self.codebook.shape[-1]

  @property
  def channels(self) -> int:
    """Output channels with a codebook of their own (1: per layer). Scalar layouts."""
    return int(self.codebook.shape[-2])

  @property
  def layers(self) -> int:
    """Layers of the stack (1 when not stacked)."""
    return math.prod(self.shape[:self.stacked])

  def dequantize(self) -> jax.Array:
    idx = self.indices.astype(jnp.int32)
    if self.vector_shape is not None:
      vectors = self.codebook[idx]  # (*rest, d)
      dense = _vectors.from_vectors(vectors, self.vector_axis, self.vector_shape)
    elif self.codebook.ndim == 2 and self.codebook.shape[0] == 1:
      dense = self.codebook[0][idx]
    else:
      # A lookup along the codebook's own axis, per (row group, channel): no flat
      # index into the codebook, so a weight sharded along its channels is read
      # shard by shard (a flat gather made XLA gather the codebook and indices).
      book = self.codebook if self.codebook.ndim == 3 else self.codebook[None]
      groups, channels, _ = book.shape
      fan_in, _ = channel_view(idx.shape, channels)
      view = idx.reshape(groups, fan_in // groups, channels)
      dense = jnp.take_along_axis(book.transpose(0, 2, 1), view, axis=1).reshape(idx.shape)
    dense = dense.astype(self.dtype)
    if self.sparse is not None:  # the kept weights, exactly
      dense = self.sparse.apply(dense)
    return dense

  def segments(self) -> tuple[jax.Array, int]:
    """Scalar layouts: each weight's cluster as a row of a (groups x k, channels)
    table (an int32 array of the weights' (fan_in, channels) view) and the
    table's number of rows. Per-cluster sums are scatters into that table,
    whose columns are the channels, so they follow a channel sharding."""
    book = self.codebook if self.codebook.ndim == 3 else self.codebook[None]
    groups, channels, k = book.shape
    fan_in, _ = channel_view(self.indices.shape, channels)
    group = jnp.arange(fan_in, dtype=jnp.int32) // (fan_in // groups)
    return group[:, None] * k + self.indices.reshape(fan_in, channels).astype(jnp.int32), \
        groups * k

  def codebook_rows(self) -> jax.Array:
    """Scalar layouts: the row of ``codebook.reshape(-1, k)`` that serves each
    weight (an int32 array of ``indices``' shape)."""
    channels = self.channels
    fan_in, _ = channel_view(self.indices.shape, channels)
    groups = self.codebook.shape[0] if self.codebook.ndim == 3 else 1
    row = jnp.arange(fan_in, dtype=jnp.int32)[:, None] // (fan_in // groups) * channels
    column = jnp.arange(channels, dtype=jnp.int32)[None, :]
    return (row + column).reshape(self.indices.shape)

  def layer_codebooks(self) -> jax.Array:
    """A stacked leaf's codebook with the stack's axes in front: (*stack, C, k)
    when each layer has one row of codebooks, (*stack, R / L, C, k) otherwise."""
    lead = tuple(self.shape[:self.stacked])
    per_layer = self.codebook.shape[0] // max(math.prod(lead), 1)
    if self.codebook.ndim == 2 or per_layer == 1:
      return self.codebook.reshape(lead + self.codebook.shape[-2:])
    return self.codebook.reshape(lead + (per_layer,) + self.codebook.shape[-2:])


def is_clustered(x) -> bool:
  """True for a ClusteredArray leaf (an ``is_leaf`` for tree maps over quantized trees)."""
  return isinstance(x, ClusteredArray)


def index_dtype(num_clusters: int):
  """The narrowest unsigned integer type for indices into ``num_clusters`` values."""
  return jnp.uint8 if num_clusters <= 256 else jnp.uint16


def dequantize(tree: Any) -> Any:
  """Replaces every :class:`ClusteredArray` by its dense array."""
  return jax.tree.map(lambda x: x.dequantize() if is_clustered(x) else x, tree,
                      is_leaf=is_clustered)


def clustered_leaves(tree: Any) -> list[tuple[str, ClusteredArray]]:
  """(path, ClusteredArray) for every clustered leaf, in tree order."""
  return [(path, leaf) for path, leaf in named_leaves(tree, is_leaf=is_clustered)
          if is_clustered(leaf)]
