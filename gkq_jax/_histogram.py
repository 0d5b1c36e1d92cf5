"""Per-group frames and weighted histograms of grouped 1-D values.

Values are handled relative to their group's centre, so a group far from
zero keeps its float32 resolution. Every group has its own number of bins;
the histograms lie end to end in flat arrays (see :mod:`gkq_jax._layout`),
and their running sums, restarted at every group, give the mass and moments
of any run of a group's bins in O(1). That is what makes a Lloyd step over
the histogram cost O(K) per group whatever the group size.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gkq_jax._layout import MAX_BINS, MIN_BINS  # noqa: F401  (MAX_BINS: the public limit)


class Frame(NamedTuple):
  """Per-group coordinates: values are handled relative to the group centre."""

  center: jax.Array  # (G,)
  half_range: jax.Array  # (G,)
  uniform: jax.Array  # (G,) bool: all-zero importance, clustered with unit weights


class Histogram(NamedTuple):
  """Every group's histogram: flat (total_bins,) arrays, group g's B_g bins
  from base[g], evenly spaced over [-half_range, half_range)."""

  weight: jax.Array  # importance mass per bin
  moment: jax.Array  # importance x (value - centre) per bin
  cum_weight: jax.Array  # running sums, restarting at every group
  cum_moment: jax.Array
  cum_square: jax.Array  # running sum of moment^2 / weight: bins as point masses
  base: jax.Array  # (G,)
  bins: jax.Array  # (G,)
  half_range: jax.Array  # (G,)
  first_tile: jax.Array  # (total_bins / 16,) bool: a group's bins start here

  def take(self, groups):
    """The per-group fields of some groups (the flat arrays are shared)."""
    return self._replace(base=self.base[groups], bins=self.bins[groups],
                         half_range=self.half_range[groups])


@functools.lru_cache(maxsize=4)
def group_ids(group_sizes: tuple[int, ...]) -> jax.Array:
  """Group index of every position, made once per layout on the host: in XLA
  it costs a scan over all values each call (or minutes of constant folding)."""
  return jnp.asarray(np.repeat(np.arange(len(group_sizes), dtype=np.int32), group_sizes))


def bin_scale(half_range, bins):
  """Bins per unit value; 0 for a constant group (all its values in bin 0)."""
  return jnp.where(half_range > 0, bins / jnp.where(half_range > 0, 2 * half_range, 1.0), 0.0)


def bin_index(xc, half_range, scale, bins):
  """Bin of values ``xc`` relative to the centre; ``bins`` may be an array."""
  b = jnp.floor((xc + half_range) * scale)
  return jnp.clip(b, 0, bins - 1).astype(jnp.int32)


def segmented_cumsum(values, first_tile):
  """Running sums of a flat array, restarting where ``first_tile`` marks the
  start of a group's bins (groups start at multiples of 16).

  Tiles of 16 are summed with one small matmul (XLA's CPU cumsum is a
  log-depth scan, ~10x slower), then the tile totals by a segmented scan: no
  running sum ever crosses a group, so small groups keep full precision."""
  tiles = values.reshape(-1, MIN_BINS)
  upper = jnp.triu(jnp.ones((MIN_BINS, MIN_BINS), values.dtype))
  within = jnp.matmul(tiles, upper, precision=jax.lax.Precision.HIGHEST)
  totals = within[:, -1]

  def add(a, b):
    (start_a, sum_a), (start_b, sum_b) = a, b
    return start_a | start_b, jnp.where(start_b, sum_b, sum_a + sum_b)

  _, running = jax.lax.associative_scan(add, (first_tile, totals))
  return (within + (running - totals)[:, None]).reshape(-1)


def make_histogram(weight, moment, base, bins, half_range, first_tile):
  """The Histogram of filled (total_bins,) buffers of mass and moment."""
  square = jnp.where(weight > 0, moment * moment / jnp.where(weight > 0, weight, 1.0), 0.0)
  cum = lambda v: segmented_cumsum(v, first_tile)
  return Histogram(weight, moment, cum(weight), cum(moment), cum(square), base, bins, half_range,
                   first_tile)


def prefix(cum, base, pos):
  """Sum over a group's bins before ``pos`` (0..B) from a running-sum array;
  ``base`` broadcasts against ``pos``."""
  return jnp.where(pos > 0, cum[jnp.maximum(base + pos - 1, 0)], 0.0)


def bin_width(hist):
  return 2 * hist.half_range / hist.bins


def bin_mean(hist, b):
  """Importance-weighted mean of bins ``b`` (G, ...) of each group (the bin
  centre when empty): non-decreasing in b."""
  base = hist.base.reshape(hist.base.shape + (1,) * (b.ndim - 1))
  shape = lambda a: a.reshape(a.shape + (1,) * (b.ndim - 1))
  w, m = hist.weight[base + b], hist.moment[base + b]
  centre = -shape(hist.half_range) + (b + 0.5) * shape(bin_width(hist))
  return jnp.where(w > 0, m / jnp.where(w > 0, w, 1.0), centre)


def search(cum, base, bins, target, max_bins: int):
  """Per group, the first bin b whose running sum reaches ``target`` (G, ...),
  i.e. prefix(b + 1) >= target, clipped to [0, B - 1]; binary search."""
  shape = lambda a: a.reshape(a.shape + (1,) * (target.ndim - 1))
  base, bins = shape(base), shape(bins)
  lo = jnp.zeros(target.shape, jnp.int32)  # first candidate
  span = max_bins
  while span > 1:
    span //= 2
    probe = lo + span  # is the answer >= probe?
    below = (probe < bins) & (prefix(cum, base, jnp.minimum(probe, bins)) < target)
    lo = jnp.where(below, probe, lo)
  return jnp.minimum(lo, bins - 1)


def resample(hist, M: int):
  """Every group's histogram merged or split into M equal bins: (weight,
  moment, weighted mean or centre) as (G, M) arrays. A group with fewer than
  M bins gets empty bins between its own."""
  pos = jnp.arange(M + 1)[None, :] * hist.bins[:, None] // M
  base = hist.base[:, None]
  W, S = prefix(hist.cum_weight, base, pos), prefix(hist.cum_moment, base, pos)
  # Running sums of tiles are separate dot products: an empty run can come out -1 ulp.
  w, m = jnp.maximum(jnp.diff(W, axis=1), 0.0), jnp.diff(S, axis=1)
  width = (2 * hist.half_range / M)[:, None]
  centres = -hist.half_range[:, None] + (jnp.arange(M) + 0.5) * width
  return w, m, jnp.where(w > 0, m / jnp.where(w > 0, w, 1.0), centres)
