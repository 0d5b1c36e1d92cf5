"""Importance-weighted k-means of scalar values, many groups in one compiled call.

All values live in one flat array in which every group (a layer, an output
channel, a whole model) is a contiguous slice; ``group_sizes`` gives the slices.
Each group gets its own codebook of at most ``num_clusters[g]`` values, padded
to a common static ``K`` so that one compilation serves every group.

The objective of group g is ``sum_i h_i (x_i - c_{a_i})^2`` (``objective="l2"``,
centroid = importance-weighted mean) or ``sum_i h_i |x_i - c_{a_i}|`` (``"l1"``,
the seed's literal criterion, centroid = weighted median). For scalars the
weight never changes which centroid is nearest, so assignment is a search over
sorted midpoints and no N x K distance matrix is ever built.

Methods:
  * ``"hist"`` (default): Lloyd on a fine weighted histogram (each iteration
    costs O(K log B), independent of N), then ``refine_iters`` Lloyd steps on
    the real values.
  * ``"lloyd"``: classic Lloyd on the real values until ``tol``/``max_iter``.
  * ``"exact"``: the optimal partition by dynamic programming
    (:mod:`gkq_jax.exact1d`), then the same refinement, which cannot increase
    the objective.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gkq_jax import exact1d

METHODS = ("hist", "lloyd", "exact")
INITS = ("dp", "companding", "density", "linear", "forgy", "kmeans++")
OBJECTIVES = ("l2", "l1")

_MAX_BINS = 65536
_KMEANSPP_BINS = 1024
_EXACT_BINS = 4096


class Clustering(NamedTuple):
  """Codebooks and assignments of a grouped clustering.

  centroids: (G, K) float32, sorted per group; entries past a group's own
    number of clusters repeat its largest centroid.
  assignments: (N,) int32 index into the group's row of ``centroids``.
  """

  centroids: jax.Array
  assignments: jax.Array


def default_bins(num_values: int, num_groups: int, num_clusters: int = 256) -> int:
  """Histogram resolution: ~256 bins per cluster (at least 16384) for big
  groups, fewer for small groups so memory stays bounded with many groups."""
  per_group = max(1, num_values // max(1, num_groups))
  bins = 1 << int(np.ceil(np.log2(max(per_group, 1))))
  wanted = 1 << int(np.ceil(np.log2(max(16384, 256 * num_clusters))))
  return int(np.clip(bins, 1024, min(wanted, _MAX_BINS)))


@functools.lru_cache(maxsize=4)
def group_ids(group_sizes: tuple[int, ...]) -> jax.Array:
  """Group index of every position, made once per layout on the host: in XLA
  it costs a scan over all values each call (or minutes of constant folding)."""
  return jnp.asarray(np.repeat(np.arange(len(group_sizes), dtype=np.int32), group_sizes))


class _Histogram(NamedTuple):
  weight: jax.Array  # (G, B) importance mass per bin
  moment: jax.Array  # (G, B) importance x (value - center) per bin
  bin_centers: jax.Array  # (G, B) relative to center
  cum_weight: jax.Array  # (G, B + 1)
  cum_moment: jax.Array  # (G, B + 1)


class _Frame(NamedTuple):
  """Per-group coordinates: values are handled relative to the group center."""

  center: jax.Array  # (G,)
  half_range: jax.Array  # (G,)
  seg: jax.Array  # (N,) group of each value
  bin_of_value: jax.Array  # (N,) flat index group * bins + bin


# Up to this many groups, per-group min/max are taken on static slices: one
# fused reduction each, ~10x cheaper than a scatter-based segment_min on CPU.
_MAX_STATIC_SLICES = 128


def _group_range(x, seg, group_sizes):
  G = len(group_sizes)
  if G <= _MAX_STATIC_SLICES:
    bounds = np.concatenate([[0], np.cumsum(group_sizes)])
    parts = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return jnp.stack([p.min() for p in parts]), jnp.stack([p.max() for p in parts])
  return (jax.ops.segment_min(x, seg, G, indices_are_sorted=True),
          jax.ops.segment_max(x, seg, G, indices_are_sorted=True))


def _frame_and_histogram(x, h, seg, group_sizes, bins):
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
  hist = _Histogram(weight, moment, centers,
                    jnp.concatenate([zero, jnp.cumsum(weight, axis=1)], axis=1),
                    jnp.concatenate([zero, jnp.cumsum(moment, axis=1)], axis=1))
  return _Frame(center, half, seg, flat_bin), hist, xc


def _bin_means(hist):
  safe = jnp.where(hist.weight > 0, hist.weight, 1.0)
  return jnp.where(hist.weight > 0, hist.moment / safe, hist.bin_centers)


# ---------------------------------------------------------------- initialisation


def _active_mask(k_active, K):
  return jnp.arange(K)[None, :] < k_active[:, None]


def _finish_init(c, active):
  return jnp.sort(jnp.where(active, c, jnp.inf), axis=1)


def _init_linear(frame, k_active, K):
  denom = jnp.maximum(k_active - 1, 1).astype(jnp.float32)
  t = jnp.arange(K)[None, :] / denom[:, None]
  c = -frame.half_range[:, None] + 2 * frame.half_range[:, None] * t
  return jnp.where((k_active == 1)[:, None], 0.0, c)


def _interpolated_quantiles(mass, left, width, k_active, K):
  """Points at cumulative fractions (k + 0.5) / k_g of ``mass`` (G, M), a
  histogram of M bins of ``width`` from ``left``, interpolated inside bins."""
  M = mass.shape[1]
  cum = jnp.concatenate([jnp.zeros_like(mass[:, :1]), jnp.cumsum(mass, 1)], 1)
  target = (jnp.arange(K)[None, :] + 0.5) / k_active[:, None] * cum[:, -1:]
  idx = jnp.clip(jax.vmap(jnp.searchsorted)(cum[:, 1:], target), 0, M - 1)
  below = jnp.take_along_axis(cum, idx, axis=1)
  here = jnp.take_along_axis(mass, idx, axis=1)
  frac = jnp.clip((target - below) / jnp.where(here > 0, here, 1.0), 0.0, 1.0)
  return left + (idx + frac) * width


def _bin_width(hist):
  # From the outermost centres: neighbouring ones would lose precision when
  # multiplied by a bin index in the tens of thousands.
  B = hist.bin_centers.shape[1]
  return (hist.bin_centers[:, -1:] - hist.bin_centers[:, :1]) / (B - 1)


def _left_edge(hist):
  return hist.bin_centers[:, :1] - _bin_width(hist) / 2


def _coarsen(hist, M):
  """(weight, moment, weighted mean or centre) of M bins merging the fine ones."""
  G, B = hist.weight.shape
  w = hist.weight.reshape(G, M, B // M).sum(-1)
  m = hist.moment.reshape(G, M, B // M).sum(-1)
  centres = hist.bin_centers.reshape(G, M, B // M).mean(-1)
  return w, m, jnp.where(w > 0, m / jnp.where(w > 0, w, 1.0), centres)


def _init_density(hist, k_active, K):
  """Weighted quantiles at (k + 0.5) / k_g, interpolated inside their bin."""
  return _interpolated_quantiles(hist.weight, _left_edge(hist), _bin_width(hist), k_active, K)


_COMPANDING_BINS = 1024


def _init_companding(hist, k_active, K, objective):
  """Quantiles of density^(1/3) (l2) or density^(1/2) (l1).

  For many clusters the optimal quantizer places centroids with a point
  density proportional to p^(1/3) (Panter & Dite; Gersho), so this start is
  already close to optimal where plain weighted quantiles crowd the centroids
  into the bulk and Lloyd needs thousands of steps to spread them out. A
  coarse histogram keeps the power law from amplifying sampling noise.
  """
  B = hist.weight.shape[1]
  M = min(B, _COMPANDING_BINS)
  w, _, _ = _coarsen(hist, M)
  dens = w ** (1 / 3 if objective == "l2" else 1 / 2)
  return _interpolated_quantiles(dens, _left_edge(hist), _bin_width(hist) * (B // M),
                                 k_active, K)


def _init_forgy(key, xc, starts, sizes, K):
  u = jax.random.uniform(key, (sizes.shape[0], K))
  idx = starts[:, None] + jnp.minimum((u * sizes[:, None]).astype(jnp.int32),
                                      sizes[:, None] - 1)
  return xc[idx]


def _init_kmeanspp(key, hist, k_active, K):
  """Greedy importance-weighted k-means++ on a coarse histogram.

  Each step draws 2 + log(K) candidates by D^2 sampling and keeps the one that
  lowers the potential most (as scikit-learn does); the sampling reaches the
  sparse tails that quantile-based starts leave to a single centroid.
  """
  G, B = hist.weight.shape
  coarse = min(B, _KMEANSPP_BINS)
  w, _, pts = _coarsen(hist, coarse)
  trials = 2 + int(np.log(max(K, 1)))

  def sample(key, p, n):
    # Inverse-CDF draws: n uniforms per group instead of a Gumbel per bin.
    p = jnp.where(jnp.any(p > 0, axis=1, keepdims=True), p, (w > 0).astype(p.dtype))
    cdf = jnp.cumsum(p, axis=1)
    u = jax.random.uniform(key, (G, n)) * cdf[:, -1:]
    idx = jax.vmap(lambda c, v: jnp.searchsorted(c, v, side="right"))(cdf, u)
    return jnp.clip(idx, 0, coarse - 1)

  keys = jax.random.split(key, K)
  first = jnp.take_along_axis(pts, sample(keys[0], w, 1), axis=1)[:, 0]
  c = jnp.full((G, K), jnp.inf).at[:, 0].set(first)
  d2 = (pts - first[:, None]) ** 2

  def body(k, carry):
    c, d2 = carry
    cand = jnp.take_along_axis(pts, sample(keys[k], w * d2, trials), axis=1)  # (G, T)
    new_d2 = jnp.minimum(d2[:, None, :], (pts[:, None, :] - cand[:, :, None]) ** 2)
    best = jnp.argmin((w[:, None, :] * new_d2).sum(-1), axis=1)
    c = c.at[:, k].set(jnp.take_along_axis(cand, best[:, None], axis=1)[:, 0])
    return c, jnp.take_along_axis(new_d2, best[:, None, None], axis=1)[:, 0]

  c, _ = jax.lax.fori_loop(1, K, body, (c, d2))
  return c


_DP_BINS = 256


def _init_dp(hist, k_active, K):
  """Optimal partition of a coarse (256-bin) histogram, by a dense DP.

  Each coarse bin is a point mass at its weighted mean; the O(K M^2) table is
  small enough to fill with plain array ops. float32 suffices here: at the
  K <= M / 8 where this is used, cluster costs are far above the rounding of
  the prefix sums. Fine Lloyd then moves each centroid to the local optimum,
  which from this start is the global one in all but contrived cases.
  """
  G, B = hist.weight.shape
  M = min(B, _DP_BINS)
  w, _, v = _coarsen(hist, M)
  zero = jnp.zeros((G, 1))
  p0 = jnp.concatenate([zero, jnp.cumsum(w, 1)], 1)
  p1 = jnp.concatenate([zero, jnp.cumsum(w * v, 1)], 1)
  p2 = jnp.concatenate([zero, jnp.cumsum(w * v * v, 1)], 1)
  # cost[g, i, j]: cost of coarse bins i..j as one cluster (inf when i > j).
  ww = p0[:, None, 1:] - p0[:, :-1, None]
  s1 = p1[:, None, 1:] - p1[:, :-1, None]
  s2 = p2[:, None, 1:] - p2[:, :-1, None]
  cost = jnp.maximum(s2 - s1 * s1 / jnp.where(ww > 0, ww, 1.0), 0.0)
  upper = jnp.arange(M)[:, None] <= jnp.arange(M)[None, :]
  cost = jnp.where(upper[None], cost, jnp.inf)

  def layer(prev, _):
    # total[g, i, j] = best (k-1) clusters of bins < i, plus bins i..j as one.
    before = jnp.concatenate([jnp.full((G, 1), jnp.inf), prev[:, :-1]], 1)
    total = before[:, :, None] + cost
    return total.min(1), total.argmin(1).astype(jnp.int32)

  first = cost[:, 0, :]
  _, starts = jax.lax.scan(layer, first, None, length=K - 1)  # (K-1, G, M)
  starts = jnp.concatenate([jnp.zeros((1, G, M), jnp.int32), starts], 0)

  def back(j, k):
    # Cluster k (when active) covers bins starts[k, j]..j.
    i = jnp.where(k > 0, starts[k, jnp.arange(G), jnp.maximum(j, 0)], 0)
    on = (k < k_active) & (j >= 0)
    lo, hi = jnp.where(on, i, 0), jnp.where(on, j, 0)
    mass = p0[jnp.arange(G), hi + 1] - p0[jnp.arange(G), lo]
    mean = (p1[jnp.arange(G), hi + 1] - p1[jnp.arange(G), lo]) / jnp.where(mass > 0, mass, 1.0)
    c = jnp.where(on & (mass > 0), mean, jnp.nan)
    return jnp.where(k < k_active, i - 1, j), c

  _, c = jax.lax.scan(back, jnp.full((G,), M - 1), jnp.arange(K - 1, -1, -1))
  c = c[::-1].T  # (G, K)
  # Empty clusters (fewer non-empty bins than clusters) reuse a real centroid.
  filled = jnp.where(jnp.isnan(c), jnp.nanmax(jnp.where(jnp.isnan(c), -jnp.inf, c), 1,
                                               keepdims=True), c)
  return filled


# ------------------------------------------------------------ histogram Lloyd


def _hist_edges(c, bin_centers):
  """Bins [e_k, e_{k+1}) belong to cluster k: bin centers below the midpoint."""
  mid = (c[:, :-1] + c[:, 1:]) / 2
  inner = jax.vmap(lambda m, v: jnp.searchsorted(v, m, side="right"))(mid, bin_centers)
  G, B = bin_centers.shape
  return jnp.concatenate([jnp.zeros((G, 1), jnp.int32), inner.astype(jnp.int32),
                          jnp.full((G, 1), B, jnp.int32)], axis=1)


def _hist_update(c, hist, means, objective, active):
  edges = _hist_edges(c, hist.bin_centers)
  w0 = jnp.take_along_axis(hist.cum_weight, edges, axis=1)
  w = w0[:, 1:] - w0[:, :-1]
  if objective == "l2":
    s0 = jnp.take_along_axis(hist.cum_moment, edges, axis=1)
    new = (s0[:, 1:] - s0[:, :-1]) / jnp.where(w > 0, w, 1.0)
  else:
    target = w0[:, :-1] + w / 2
    b = jax.vmap(lambda cw, t: jnp.searchsorted(cw, t, side="left"))(hist.cum_weight, target) - 1
    b = jnp.clip(b, 0, means.shape[1] - 1)
    new = jnp.take_along_axis(means, b, axis=1)
  return jnp.where(active, jnp.where(w > 0, new, c), jnp.inf)


def _converged(old, new, active, frame, tol):
  delta = jnp.where(active, jnp.abs(new - old), 0.0).max(axis=1)
  return jnp.all(delta <= tol * 2 * frame.half_range)


def _hist_lloyd(c, hist, objective, active, frame, max_iter, tol):
  means = _bin_means(hist)

  def cond(state):
    it, _, done = state
    return jnp.logical_and(it < max_iter, jnp.logical_not(done))

  def body(state):
    it, c, _ = state
    new = _hist_update(c, hist, means, objective, active)
    return it + 1, new, _converged(c, new, active, frame, tol)

  _, c, _ = jax.lax.while_loop(cond, body, (0, c, False))
  return c


# ----------------------------------------------------------------- data Lloyd


def _padded_midpoints(c):
  """(G, K + 1): cluster k owns the interval (mid[k], mid[k + 1]]."""
  G = c.shape[0]
  mid = (c[:, :-1] + c[:, 1:]) / 2
  return jnp.concatenate([jnp.full((G, 1), -jnp.inf), mid, jnp.full((G, 1), jnp.inf)], axis=1)


def assign_nearest(xc, c, frame, hist):
  """Index of the nearest centroid of each value's own group.

  Each histogram bin knows the cluster of its left edge and the first midpoint
  above it, so one gather and one comparison place a value exactly when its
  bin holds at most one midpoint; the rare bins with more are settled by a
  short walk over the midpoints.
  """
  G, K = c.shape
  mid = _padded_midpoints(c)  # (G, K + 1)
  half_width = (hist.bin_centers[:, 1:2] - hist.bin_centers[:, 0:1]) / 2
  left_edge = hist.bin_centers - half_width
  right_edge = hist.bin_centers + half_width
  search = jax.vmap(lambda m, v: jnp.searchsorted(m, v, side="left"))
  a_left = search(mid[:, 1:K], left_edge).astype(jnp.int32)
  a_right = search(mid[:, 1:K], right_edge).astype(jnp.int32)
  threshold = jnp.take_along_axis(mid, a_left + 1, axis=1)
  flat = frame.bin_of_value
  a = a_left.reshape(-1)[flat] + (xc > threshold.reshape(-1)[flat]).astype(jnp.int32)

  flat_mid = mid.reshape(-1)
  row = frame.seg * (K + 1)

  def walk(a):
    def cond(state):
      return state[1]

    def body(state):
      a, _ = state
      up = xc > flat_mid[row + a + 1]
      down = xc <= flat_mid[row + a]
      return a + up.astype(jnp.int32) - down.astype(jnp.int32), jnp.any(up | down)

    return jax.lax.while_loop(cond, body, (a, True))[0]

  crowded = jnp.any(a_right - a_left > 1)
  return jax.lax.cond(crowded, walk, lambda a: a, a)


def _weighted_medians(xc, h, cluster, num_segments):
  """Exact weighted median of each segment (lower median; sort-based)."""
  order = jnp.lexsort((xc, cluster))
  xs, hs, cs = xc[order], h[order], cluster[order]
  cum = jnp.cumsum(hs)
  total = jax.ops.segment_sum(hs, cs, num_segments, indices_are_sorted=True)
  start_cum = jnp.concatenate([jnp.zeros((1,), cum.dtype), jnp.cumsum(total)[:-1]])
  # First sorted member whose cumulative weight (within its segment) reaches half.
  within = cum - start_cum[cs]
  reach = within >= total[cs] / 2
  pos = jnp.where(reach, jnp.arange(xs.shape[0]), xs.shape[0])
  first = jax.ops.segment_min(pos, cs, num_segments, indices_are_sorted=True)
  found = first < xs.shape[0]
  return jnp.where(found, xs[jnp.clip(first, 0, xs.shape[0] - 1)], 0.0), total > 0


def _data_update(xc, h, a, c, frame, objective, active):
  G, K = c.shape
  cluster = frame.seg * K + a
  if objective == "l2":
    sums = jax.ops.segment_sum(jnp.stack([h, h * xc], -1), cluster, G * K)
    w, s = sums[:, 0].reshape(G, K), sums[:, 1].reshape(G, K)
    new = jnp.where(w > 0, s / jnp.where(w > 0, w, 1.0), c)
  else:
    med, nonempty = _weighted_medians(xc, h, cluster, G * K)
    new = jnp.where(nonempty.reshape(G, K), med.reshape(G, K), c)
  # Means of contiguous clusters stay sorted; sort anyway against rounding.
  return jnp.sort(jnp.where(active, new, jnp.inf), axis=1)


def _data_lloyd(xc, h, c, frame, hist, objective, active, max_iter, tol):
  def cond(state):
    it, _, done = state
    return jnp.logical_and(it < max_iter, jnp.logical_not(done))

  def body(state):
    it, c, _ = state
    a = assign_nearest(xc, c, frame, hist)
    new = _data_update(xc, h, a, c, frame, objective, active)
    return it + 1, new, _converged(c, new, active, frame, tol)

  _, c, _ = jax.lax.while_loop(cond, body, (0, c, max_iter <= 0))
  return c


# ---------------------------------------------------------------------- driver


@functools.partial(
    jax.jit,
    static_argnames=("group_sizes", "K", "method", "init", "objective", "max_iter",
                     "tol", "bins", "refine_iters", "exact_max_points"))
def _grouped_kmeans(x, h, k_active, key, seg, sizes, *, group_sizes, K, method, init, objective,
                    max_iter, tol, bins, refine_iters, exact_max_points):
  G = len(group_sizes)
  starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(sizes)[:-1]])
  # A group whose importance is all zero is clustered with uniform weights.
  mass = jax.ops.segment_sum(h, seg, G, indices_are_sorted=True)
  h = jnp.where((mass > 0)[seg], h, 1.0)
  frame, hist, xc = _frame_and_histogram(x, h, seg, group_sizes, bins)
  active = _active_mask(k_active, K)

  if method == "exact":
    c = exact1d.optimal_centroids_callback(xc, h, sizes, k_active, K, objective,
                                           bins, exact_max_points)
    c = jnp.where(active, c, jnp.inf)
  else:
    k_init, _ = jax.random.split(key)
    if init == "dp" and K * 8 > min(bins, _DP_BINS):
      init = "kmeans++"  # too many clusters for the coarse table to help
    if init == "dp":
      c = _init_dp(hist, k_active, K)
    elif init == "companding":
      c = _init_companding(hist, k_active, K, objective)
    elif init == "linear":
      c = _init_linear(frame, k_active, K)
    elif init == "density":
      c = _init_density(hist, k_active, K)
    elif init == "forgy":
      c = _init_forgy(k_init, xc, starts, sizes, K)
    else:
      c = _init_kmeanspp(k_init, hist, k_active, K)
    c = _finish_init(c, active)
    if method == "hist":
      c = _hist_lloyd(c, hist, objective, active, frame, max_iter, tol)

  lloyd_iters = max_iter if method == "lloyd" else refine_iters
  lloyd_tol = tol if method == "lloyd" else 0.0
  c = _data_lloyd(xc, h, c, frame, hist, objective, active, lloyd_iters, lloyd_tol)
  a = assign_nearest(xc, c, frame, hist)
  # Pad inactive slots with the largest active centroid: a group never holds
  # more distinct values than it asked for, and nothing is infinite.
  last = jnp.take_along_axis(c, jnp.maximum(k_active - 1, 0)[:, None], axis=1)
  c = jnp.where(active, c, last)
  return Clustering(c + frame.center[:, None], a)


# ------------------------------------------------------------------ public API


def _is_traced(*arrays):
  return any(isinstance(a, jax.core.Tracer) for a in arrays)


def _check_options(method, init, objective, max_iter, tol):
  for name, value, allowed in (("method", method, METHODS), ("init", init, INITS),
                               ("objective", objective, OBJECTIVES)):
    if value not in allowed:
      raise ValueError(f"{name}={value!r} is not one of {allowed}.")
  if max_iter < 0 or tol < 0:
    raise ValueError(f"max_iter and tol must be >= 0, got {max_iter} and {tol}.")


def check_finite(name: str, array) -> None:
  """Raises a ValueError naming the first NaN/inf entry of a concrete array."""
  if _is_traced(array):
    return
  a = np.asarray(array)
  bad = ~np.isfinite(a)
  if bad.any():
    first = np.unravel_index(int(np.argmax(bad)), a.shape) if a.ndim else ()
    raise ValueError(f"{name} has {int(bad.sum())} non-finite entries (NaN or inf), "
                     f"first at index {tuple(int(i) for i in first)}; "
                     "clean or clip them before clustering.")


def grouped_kmeans_1d(values, importance, group_sizes: Sequence[int], num_clusters, *,
                      method: str = "hist", init: str = "dp",
                      objective: str = "l2", max_iter: int = 300, tol: float = 1e-6,
                      key=None, bins: int | None = None, refine_iters: int = 1,
                      exact_max_points: int = 4096) -> Clustering:
  """Clusters each contiguous group of ``values`` into its own codebook.

  Args:
    values: (N,) floats; group g is ``values[sum(group_sizes[:g]):][:group_sizes[g]]``.
    importance: (N,) non-negative weights (e.g. mean |dL/dw| or mean g^2), or
      None for plain k-means. A group whose importance is all zero falls back
      to uniform weights (with a warning when called outside jit).
    group_sizes: static positive sizes summing to N.
    num_clusters: an int for every group, or one int per group.
    method: "hist" (default), "lloyd" or "exact"; see the module docstring.
    init: "dp" (default: the optimal partition of a coarse 256-bin histogram;
      greedy "kmeans++" when K > 32), "companding" (quantiles of density^(1/3), the
      asymptotically optimal spacing), "density" (weighted quantiles),
      "linear" (min..max), "forgy" (random members) or "kmeans++"
      (importance-weighted D^2 sampling). Ignored by method="exact".
    objective: "l2" (weighted mean centroids) or "l1" (weighted medians; the
      data-level refinement then costs one sort).
    max_iter, tol: Lloyd stops after max_iter steps or when no centroid moves
      by more than tol x the group's value range.
    key: PRNG key for "forgy" / "kmeans++"; the result is a pure function of it.
    bins: histogram bins per group (default: from the group size and K, at
      most 65536; at most 4096 for the exact method's DP).
    refine_iters: Lloyd steps on the real values after "hist" / "exact".
    exact_max_points: "exact" runs on the sorted values themselves when every
      group has at most this many, otherwise on a histogram of ``bins`` bins.

  Returns:
    :class:`Clustering` with centroids (G, K), K = max(num_clusters), and
    assignments (N,). A group never holds more than its own number of distinct
    centroid values; with more clusters than distinct values some clusters
    are simply empty (duplicated centroids), never NaN.
  """
  _check_options(method, init, objective, max_iter, tol)
  group_sizes = tuple(int(s) for s in group_sizes)
  if not group_sizes or min(group_sizes) < 1:
    raise ValueError(f"group_sizes must be positive, got {group_sizes[:8]}...")
  values = jnp.asarray(values)
  if values.ndim != 1 or values.shape[0] != sum(group_sizes):
    raise ValueError(f"values must be 1-D with sum(group_sizes)={sum(group_sizes)} "
                     f"entries, got shape {values.shape}.")
  if not jnp.issubdtype(values.dtype, jnp.floating):
    raise ValueError(f"values must be floating point, got {values.dtype}.")
  values = values.astype(jnp.float32)
  if importance is None:
    importance = jnp.ones_like(values)
  importance = jnp.asarray(importance, jnp.float32)
  if importance.shape != values.shape:
    raise ValueError(f"importance has shape {importance.shape}, values {values.shape}; "
                     "they must match.")
  k = np.broadcast_to(np.asarray(num_clusters, np.int64), (len(group_sizes),))
  if k.min() < 1:
    raise ValueError(f"num_clusters must be >= 1, got {int(k.min())}.")
  check_finite("values", values)
  check_finite("importance", importance)
  if not _is_traced(importance):
    h = np.asarray(importance)
    if (h < 0).any():
      raise ValueError("importance must be non-negative (use |g| or g^2), found "
                       f"{int((h < 0).sum())} negative entries.")
    starts = np.concatenate([[0], np.cumsum(group_sizes)[:-1]])
    zero = np.flatnonzero(np.add.reduceat(h, starts) == 0)
    if zero.size:
      import warnings
      warnings.warn(f"{zero.size} group(s) have all-zero importance (first: group "
                    f"{int(zero[0])}); clustering them with uniform weights.",
                    stacklevel=2)
  if key is None:
    key = jax.random.PRNGKey(0)
  K = int(k.max())
  if not bins:
    bins = default_bins(values.shape[0], len(group_sizes), int(k.max()))
    if method == "exact":  # the host DP costs O(K bins log bins) per group
      bins = min(bins, _EXACT_BINS)
  return _grouped_kmeans(values, importance, jnp.asarray(k, jnp.int32), key,
                         group_ids(group_sizes), jnp.asarray(group_sizes, jnp.int32),
                         group_sizes=group_sizes, K=K, method=method, init=init,
                         objective=objective, max_iter=int(max_iter), tol=float(tol),
                         bins=int(bins), refine_iters=int(refine_iters),
                         exact_max_points=int(exact_max_points))


def kmeans_1d(values, importance=None, num_clusters: int = 16, **kwargs) -> Clustering:
  """Importance-weighted k-means of one array of scalars (any shape).

  Returns centroids (K,) and assignments of ``values``' shape. See
  :func:`grouped_kmeans_1d` for the options.
  """
  values = jnp.asarray(values)
  flat_h = None if importance is None else jnp.asarray(importance).reshape(-1)
  out = grouped_kmeans_1d(values.reshape(-1), flat_h, (values.size,), num_clusters,
                          **kwargs)
  return Clustering(out.centroids[0], out.assignments.reshape(values.shape))


def weighted_error(values, importance, centroids, assignments, objective="l2"):
  """sum h (x - c_a)^2 (l2) or sum h |x - c_a| (l1) for one group."""
  diff = jnp.abs(jnp.asarray(values) - jnp.asarray(centroids)[assignments])
  h = jnp.ones_like(diff) if importance is None else jnp.asarray(importance)
  return jnp.sum(h * (diff * diff if objective == "l2" else diff))
