"""Lossless codebooks: a group with no more distinct values than codebook entries.

Re-clustering an already-shared or int8 model, or a tiny layer, gives groups
(a layer, a channel, a codebook row) that hold at most K distinct values. The
clustering algorithms compute centroids as means relative to the group's
centre, which lands 1-2 ulp off (0.3 comes back as 0.29999995); users check
``decoded == original`` there. The assembly of every method's results
(:func:`gkq_jax.quantize`, :func:`gkq_jax.cluster_per_channel`, the byte
budget's candidates) therefore replaces the codebook of such a group by its
distinct values themselves, with each weight's index pointing at its own
value, once, after whatever algorithm ran; the file restores a leaf stored
raw the same way.

Values are compared as numbers (``==``), so -0.0 and 0.0 share the entry 0.0, as
clustering treats them; the file's restore (``bitwise``) tells them apart by their bits,
so that a leaf stored raw decodes bit for bit as before saving.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gkq_jax._clustering import is_traced

_INT_MIN = np.iinfo(np.int32).min


def _order_key(x):
  """int32 keys in the order of the float32 values (-0.0 just before 0.0)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


@functools.partial(jax.jit, static_argnames=("num_groups", "width", "zero_first", "bitwise"))
def distinct(x, seg, *, num_groups: int, width: int, zero_first: bool = False,
             bitwise: bool = False):
  """The distinct values of every group of ``x`` (groups given per value by ``seg``).

  Returns (count, book, rank): count (G,) distinct values per group; book
  (G, width) float32, each group's distinct values sorted (with
  ``zero_first``, +0.0 first wherever the group holds it), padded with its
  last one (entries past ``width`` are left out); rank (N,) int32, the
  position of each value's own entry in its group's row. ``bitwise``: -0.0
  and 0.0 are two values (else both are 0.0).
  """
  x = jnp.asarray(x, jnp.float32)
  if not bitwise:
    x = jnp.where(x == 0, jnp.float32(0), x)
  n = x.shape[0]
  key = _order_key(x)
  if zero_first:  # the slot of a pinned zero: no float's key is INT_MIN
    key = jnp.where(key == 0, jnp.int32(_INT_MIN), key)
  seg_s, key_s, pos = jax.lax.sort((jnp.asarray(seg, jnp.int32), key,
                                    jnp.arange(n, dtype=jnp.int32)), num_keys=2)
  new = jnp.concatenate([jnp.ones(1, bool),
                         (seg_s[1:] != seg_s[:-1]) | (key_s[1:] != key_s[:-1])])
  run = jnp.cumsum(new.astype(jnp.int32)) - 1  # distinct ids over all groups
  rank_s = run - jax.ops.segment_min(run, seg_s, num_groups)[seg_s]
  count = jnp.maximum(jax.ops.segment_max(rank_s, seg_s, num_groups) + 1, 0)
  column = jnp.where(new & (rank_s < width), rank_s, width)
  book = jnp.zeros((num_groups, width), jnp.float32).at[seg_s, column].set(x[pos], mode="drop")
  last = jnp.clip(count - 1, 0, width - 1)
  book = jnp.where(jnp.arange(width)[None, :] < count[:, None], book,
                   jnp.take_along_axis(book, last[:, None], axis=1))
  rank = jnp.zeros(n, jnp.int32).at[pos].set(rank_s)
  return count, book, rank


@functools.partial(jax.jit, static_argnames=("width",))
def _few_distinct_first(x, start, size, capacity, *, width: int):
  """Per group: whether its first ``width`` values (all of a smaller group) hold at
  most ``capacity`` distinct values, a necessary condition for the whole group."""
  at = start[:, None] + jnp.minimum(jnp.arange(width)[None, :], size[:, None] - 1)
  sample = jnp.sort(jnp.where(x[at] == 0, jnp.float32(0), x[at]), axis=1)
  return 1 + jnp.sum(sample[:, 1:] != sample[:, :-1], axis=1) <= capacity


def exact_groups(x, seg, capacity, centroids, assignments):
  """Grouped clustering results with every group that has at most ``capacity[g]``
  distinct values given those values as its codebook row (sorted, padded with the
  largest) and each value's index pointing at its own entry; other groups as they are.

  ``centroids`` (G, K), ``assignments`` (N,) as :func:`gkq_jax.grouped_kmeans_1d`
  returns them for values ``x`` in contiguous groups ``seg`` (a host array or a
  concrete one). Outside ``jax.jit`` the sort this takes is skipped when no
  group can qualify: when each group's first K + 1 values are already all
  distinct (ordinary float weights), which costs a (G, K + 1) sort.
  """
  G, K = centroids.shape
  capacity = jnp.asarray(capacity, jnp.int32)
  if not is_traced(x, centroids, assignments, capacity):
    seg_host = np.asarray(seg)
    start = np.searchsorted(seg_host, np.arange(G)).astype(np.int32)
    size = np.diff(np.append(start, seg_host.size)).astype(np.int32)
    if not bool(jnp.any(_few_distinct_first(jnp.asarray(x, jnp.float32), start, size, capacity,
                                            width=K + 1))):
      return centroids, assignments
  count, book, rank = distinct(x, seg, num_groups=G, width=K)
  exact = count <= capacity
  return (jnp.where(exact[:, None], book, centroids),
          jnp.where(exact[jnp.asarray(seg)], rank, assignments).astype(assignments.dtype))


def distinct_vectors(points: np.ndarray, bitwise: bool = False):
  """(distinct rows of ``points``, index of each row's own), as :func:`distinct` compares."""
  points = np.ascontiguousarray(points, np.float32)
  if not bitwise:
    points = np.where(points == 0, np.float32(0), points)
  _, first, inverse = np.unique(points.view(np.int32), axis=0, return_index=True,
                                return_inverse=True)
  return points[first], inverse.reshape(-1)
