"""How grouped 1-D k-means lays out its groups: value rows and histogram bins.

Everything here is decided on the host from the static group sizes, so the
compiled clustering has fixed shapes, does no per-group Python work, and
compiles once whatever the sizes:

* Rows. The values are read as a (rows, width) matrix in which every group
  owns whole rows (its last row padded with copies of its own last value, at
  zero weight). Per-group work on values is then a dense reduction along rows
  plus a small reduction over the rows of a group; no N x K array and no
  per-value group id are needed, whether the values form one group, 37
  layers or 10^5 groups of 128.
* Bins. Each group gets a weighted histogram whose number of bins depends on
  its own size and K only (a group clusters identically alone or among
  others). All histograms sit end to end in one flat buffer that a single
  scatter fills; every group's bins start at a multiple of 16 (see
  :func:`gkq_jax._histogram.segmented_cumsum`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MAX_BINS = 65536
MIN_BINS = 16
# Bins per group: a power of two around half the group size, at least 32 per
# cluster: with 4, a group of a few hundred values ended up to 7% above its
# optimal clustering (tests/library/test_kmeans1d.py, the one-percent test).
_BINS_PER_CLUSTER = 32
# ... and at least 512 (a group of a few hundred values, past the exact DP's
# reach, gets about a bin per value: 4 clusters on 128 bins of 300 values
# landed 1.4% above the optimum).
_MIN_DEFAULT_BINS = 512
# Values per row chunk of the streamed passes over the data: the only memory
# that grows with the number of values besides inputs, output and histograms.
_CHUNK_VALUES = 1 << 16
_WIDTHS = (64, 32, 16, 8)
_MAX_PADDING = 0.125


class Plan(NamedTuple):
  """The static part of a layout (hashable: a jit static argument)."""

  num_groups: int
  num_values: int
  width: int
  num_rows: int  # padded to a multiple of chunk_rows
  chunk_rows: int
  padded: bool  # some group's size is not a multiple of width
  total_bins: int
  max_bins: int


class Arrays(NamedTuple):
  """The array part of a layout (traced: one compilation per Plan)."""

  row_group: jax.Array  # (R,) group of each row; num_groups for filler rows
  row_start: jax.Array  # (R,) flat index of each row's first value
  row_count: jax.Array  # (R,) real (not padding) values in each row
  group_start: jax.Array  # (G,)
  group_size: jax.Array  # (G,)
  bins: jax.Array  # (G,) histogram bins of each group
  hist_base: jax.Array  # (G,) first bin of each group in the flat histogram
  first_tile: jax.Array  # (total_bins / 16,) bool: a group's bins start here
  out_index: jax.Array | None  # (N,) row-major position of each value when padded


def default_bins(group_size: int, num_clusters: int) -> int:
  """Bins of one group: a power of two between a quarter and half the group
  size, at least 32 per cluster (but not more than the size), at most
  max(16384, 256 K) and 65536. A pure function of the group itself, so a group
  clusters the same alone or among others."""
  cap = min(max(16384, 256 * num_clusters), MAX_BINS)
  floor = min(_pow2_ceil(group_size),
              max(_pow2_ceil(_BINS_PER_CLUSTER * num_clusters), _MIN_DEFAULT_BINS))
  return int(np.clip(_pow2_floor(group_size) // 2, max(floor, MIN_BINS), cap))


def _pow2_ceil(n: int) -> int:
  return 1 << max(0, int(n - 1).bit_length())


def _pow2_floor(n: int) -> int:
  return 1 << max(0, int(n).bit_length() - 1)


def _row_width(sizes: np.ndarray) -> int:
  """The widest row that pads the values by at most 12.5% (rows of 8 else)."""
  for width in _WIDTHS:
    padded = int((-(-sizes // width) * width).sum())
    if padded - sizes.sum() <= _MAX_PADDING * sizes.sum():
      return width
  return _WIDTHS[-1]


@functools.lru_cache(maxsize=4)
def _plan(group_sizes: tuple[int, ...], num_clusters: int, bins: int | None):
  sizes = np.asarray(group_sizes, np.int64)
  G, N = sizes.size, int(sizes.sum())
  width = _row_width(sizes)
  rows_per_group = -(-sizes // width)
  real_rows = int(rows_per_group.sum())
  chunk_rows = max(1, min(_CHUNK_VALUES // width, real_rows))
  num_rows = -(-real_rows // chunk_rows) * chunk_rows
  group_start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  first_row = np.concatenate([[0], np.cumsum(rows_per_group)[:-1]])
  row_group = np.repeat(np.arange(G), rows_per_group)
  within = np.arange(real_rows) - first_row[row_group]
  row_start = group_start[row_group] + within * width
  row_count = np.minimum(width, sizes[row_group] - within * width)
  filler = num_rows - real_rows
  row_group = np.concatenate([row_group, np.full(filler, G)])
  row_start = np.concatenate([row_start, np.zeros(filler, np.int64)])
  row_count = np.concatenate([row_count, np.zeros(filler, np.int64)])

  if bins:
    group_bins = np.full(G, int(bins), np.int64)
  else:
    distinct, inverse = np.unique(sizes, return_inverse=True)
    group_bins = np.array([default_bins(int(n), num_clusters) for n in distinct])[inverse]
  hist_base = np.concatenate([[0], np.cumsum(group_bins)[:-1]])
  total_bins = int(group_bins.sum())
  first_tile = np.zeros(total_bins // MIN_BINS, bool)
  first_tile[hist_base // MIN_BINS] = True

  padded = bool((sizes % width).any())
  i32 = lambda a: jnp.asarray(np.asarray(a, np.int32))
  out_index = None
  if padded:  # value i of group g sits at row-major position i + first_row*width - start
    shift = (first_row * width - group_start).astype(np.int32)
    out_index = jnp.asarray(np.arange(N, dtype=np.int32) + np.repeat(shift, sizes))
  plan = Plan(G, N, width, int(num_rows), int(chunk_rows), padded, total_bins,
              int(group_bins.max()))
  return plan, Arrays(i32(row_group), i32(row_start), i32(row_count), i32(group_start),
                      i32(sizes), i32(group_bins), i32(hist_base), jnp.asarray(first_tile),
                      out_index)


def make(group_sizes: tuple[int, ...], num_clusters: int, bins: int | None = None):
  """(Plan, Arrays) for these group sizes, cached: repeated calls on the same
  layout (a training loop re-clustering) cost no host work."""
  return _plan(tuple(int(s) for s in group_sizes), int(num_clusters),
               None if bins is None else int(bins))
