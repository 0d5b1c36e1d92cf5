"""Per-group coordinates and weighted histograms of grouped 1-D values.

Values are handled relative to their group's centre, so a group far from
zero keeps its float32 resolution. The histogram's cumulative sums give the
mass and first moment of any run of bins in O(1), which is what makes a
Lloyd step over the histogram cost O(K log B) whatever the group size.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MAX_BINS = 65536
# Up to this many groups, per-group min/max are taken on static slices: one
# fused reduction each, ~10x cheaper than a scatter-based segment_min on CPU.
_MAX_STATIC_SLICES = 128


class Histogram(NamedTuple):
  weight: jax.Array  # (G, B) importance mass per bin
  moment: jax.Array  # (G, B) importance x (value - center) per bin
  bin_centers: jax.Array  # (G, B) relative to center
  cum_weight: jax.Array  # (G, B + 1)
  cum_moment: jax.Array  # (G, B + 1)


class Frame(NamedTuple):
  """Per-group coordinates: values are handled relative to the group center."""

  center: jax.Array  # (G,)
  half_range: jax.Array  # (G,)
  seg: jax.Array  # (N,) group of each value
  bin_of_value: jax.Array  # (N,) flat index group * bins + bin


def default_bins(num_values: int, num_groups: int, num_clusters: int = 256) -> int:
  """Histogram resolution: ~256 bins per cluster (at least 16384) for big
  groups, fewer for small groups so memory stays bounded with many groups."""
  per_group = max(1, num_values // max(1, num_groups))
  bins = 1 << int(np.ceil(np.log2(max(per_group, 1))))
  wanted = 1 << int(np.ceil(np.log2(max(16384, 256 * num_clusters))))
  return int(np.clip(bins, 1024, min(wanted, MAX_BINS)))


@functools.lru_cache(maxsize=4)
def group_ids(group_sizes: tuple[int, ...]) -> jax.Array:
  """Group index of every position, made once per layout on the host: in XLA
  it costs a scan over all values each call (or minutes of constant folding)."""
  return jnp.asarray(np.repeat(np.arange(len(group_sizes), dtype=np.int32), group_sizes))


def _group_range(x, seg, group_sizes):
  G = len(group_sizes)
  if G <= _MAX_STATIC_SLICES:
    bounds = np.concatenate([[0], np.cumsum(group_sizes)])
    parts = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return jnp.stack([p.min() for p in parts]), jnp.stack([p.max() for p in parts])
  return (jax.ops.segment_min(x, seg, G, indices_are_sorted=True),
          jax.ops.segment_max(x, seg, G, indices_are_sorted=True))


def frame_and_histogram(x, h, seg, group_sizes, bins):
  """(Frame, Histogram, values relative to their group's centre)."""
  num_groups = len(group_sizes)
  lo, hi = _group_range(x, seg, group_sizes)
  center = (lo + hi) / 2
  half = (hi - lo) / 2
  scale = jnp.where(hi > lo, bins / jnp.where(hi > lo, hi - lo, 1.0), 0.0)
  xc = x - center[seg]
  b = jnp.clip(jnp.floor((xc + half[seg]) * scale[seg]), 0, bins - 1).astype(jnp.int32)
  flat_bin = seg * bins + b
  weight = jax.ops.segment_sum(h, flat_bin, num_groups * bins).reshape(num_groups, bins)
  moment = jax.ops.segment_sum(h * xc, flat_bin, num_groups * bins).reshape(num_groups, bins)
  width = 2 * half / bins
  centers = -half[:, None] + (jnp.arange(bins) + 0.5) * width[:, None]
  zero = jnp.zeros((num_groups, 1), x.dtype)
  hist = Histogram(weight, moment, centers,
                   jnp.concatenate([zero, jnp.cumsum(weight, axis=1)], axis=1),
                   jnp.concatenate([zero, jnp.cumsum(moment, axis=1)], axis=1))
  return Frame(center, half, seg, flat_bin), hist, xc


def bin_means(hist):
  """Importance-weighted mean of each bin (its centre when empty)."""
  safe = jnp.where(hist.weight > 0, hist.weight, 1.0)
  return jnp.where(hist.weight > 0, hist.moment / safe, hist.bin_centers)


def bin_width(hist):
  # From the outermost centres: neighbouring ones would lose precision when
  # multiplied by a bin index in the tens of thousands.
  B = hist.bin_centers.shape[1]
  return (hist.bin_centers[:, -1:] - hist.bin_centers[:, :1]) / (B - 1)


def left_edge(hist):
  return hist.bin_centers[:, :1] - bin_width(hist) / 2


def coarsen(hist, M):
  """(weight, moment, weighted mean or centre) of M bins merging the fine ones."""
  G, B = hist.weight.shape
  w = hist.weight.reshape(G, M, B // M).sum(-1)
  m = hist.moment.reshape(G, M, B // M).sum(-1)
  centres = hist.bin_centers.reshape(G, M, B // M).mean(-1)
  return w, m, jnp.where(w > 0, m / jnp.where(w > 0, w, 1.0), centres)
