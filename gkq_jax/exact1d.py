"""Optimal 1-D weighted k-means / k-medians by dynamic programming.

The optimal partition of sorted scalars into k clusters is contiguous, so
``D[k][j] = min_i D[k-1][i-1] + cost(i, j)`` over sorted points (Wang & Song's
Ckmeans.1d.dp). The best split ``i`` is monotone in ``j``, which lets every
layer of the table be filled by divide and conquer in O(M log M); here all
groups and all nodes of one recursion level are evaluated together as one
vectorised step.

It runs in float64 on the host: cluster costs at K = 256 are ~1e-8 of the
group's total weighted sum of squares, below float32 resolution of the prefix
sums that give O(1) range costs. :func:`optimal_centroids_callback` wraps it in
``jax.pure_callback`` so it can sit inside jitted code.

For groups of at most ``exact_max_points`` values the points themselves are
used (exact). Larger groups are first reduced to a weighted histogram of
``bins`` bins (exact for the histogram; the caller then refines on the data).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Bound on the (K, groups, points) table of best splits held at once.
_MAX_TABLE_ENTRIES = 1 << 25


def _group_points(x, h, group_sizes, bins, exact_max_points):
  """Per group: sorted support points and their weights, padded to one width."""
  sizes = np.asarray(group_sizes, np.int64).reshape(-1)
  G = len(sizes)
  seg = np.repeat(np.arange(G), sizes)
  if sizes.max() <= exact_max_points:
    order = np.lexsort((x, seg))
    pts, wts, gid = x[order], h[order], seg[order]
  else:
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    lo = np.minimum.reduceat(x, starts)
    hi = np.maximum.reduceat(x, starts)
    scale = np.where(hi > lo, bins / np.where(hi > lo, hi - lo, 1.0), 0.0)
    b = np.clip(np.floor((x - lo[seg]) * scale[seg]), 0, bins - 1).astype(np.int64)
    flat = seg * bins + b
    wts = np.bincount(flat, weights=h, minlength=G * bins)
    mom = np.bincount(flat, weights=h * x, minlength=G * bins)
    gid = np.repeat(np.arange(G), bins)
    pts = np.where(wts > 0, mom / np.where(wts > 0, wts, 1.0), 0.0)
  keep = wts > 0
  pts, wts, gid = pts[keep], wts[keep], gid[keep]
  counts = np.bincount(gid, minlength=G)
  width = max(int(counts.max()), 1)
  first = np.concatenate([[0], np.cumsum(counts)[:-1]])
  rank = np.arange(pts.size) - first[gid]
  # Padding points carry no weight and sit on the group's largest value.
  last = pts[np.maximum(first + counts - 1, 0)] if pts.size else np.zeros(G)
  P = np.repeat(last[:, None], width, axis=1)
  W = np.zeros((G, width))
  P[gid, rank] = pts
  W[gid, rank] = wts
  return P, W


class _RangeCost:
  """O(1) cost of a contiguous range of one group's sorted points."""

  def __init__(self, points, weights, objective):
    G, M = points.shape
    self.M = M
    self.x = points.reshape(-1)
    w = weights.reshape(-1)
    zero = np.zeros(1)
    self.q0 = np.concatenate([zero, np.cumsum(w)])
    self.q1 = np.concatenate([zero, np.cumsum(w * self.x)])
    self.q2 = np.concatenate([zero, np.cumsum(w * self.x * self.x)])
    self.objective = objective

  def __call__(self, g, i, j):
    a, b = g * self.M + i, g * self.M + j + 1
    w = self.q0[b] - self.q0[a]
    s1 = self.q1[b] - self.q1[a]
    if self.objective == "l2":
      s2 = self.q2[b] - self.q2[a]
      return np.maximum(s2 - s1 * s1 / np.where(w > 0, w, 1.0), 0.0)
    m = self.median_index(a, b, w)
    med = self.x[m]
    wl, sl = self.q0[m + 1] - self.q0[a], self.q1[m + 1] - self.q1[a]
    return np.maximum(med * wl - sl + (s1 - sl) - med * (w - wl), 0.0)

  def median_index(self, a, b, w):
    m = np.searchsorted(self.q0, self.q0[a] + w / 2, side="left") - 1
    return np.clip(m, a, b - 1)

  def centroid(self, g, i, j):
    a, b = g * self.M + i, g * self.M + j + 1
    w = self.q0[b] - self.q0[a]
    if self.objective == "l2":
      c = (self.q1[b] - self.q1[a]) / np.where(w > 0, w, 1.0)
    else:
      c = self.x[self.median_index(a, b, w)]
    return np.where(w > 0, c, self.x[a])


def _best_splits(cost, G, M, k_active, K):
  """opt[k, g, j]: first point of cluster k in the best (k+1)-clustering of 0..j."""
  groups = np.arange(G)
  D = cost(groups[:, None], np.zeros((G, M), np.int64), np.arange(M)[None, :])
  opt = np.zeros((K, G, M), np.int32)
  for k in range(1, K):
    g = np.flatnonzero(k_active > k)
    if g.size == 0:
      break
    D_new = np.full((G, M), np.inf)
    n = g.size
    jlo, jhi = np.full(n, k), np.full(n, M - 1)
    olo, ohi = np.full(n, k), np.full(n, M - 1)
    while g.size:
      mid = (jlo + jhi) // 2
      chi = np.minimum(ohi, mid)
      cnt = chi - olo + 1
      starts = np.cumsum(cnt) - cnt
      node = np.repeat(np.arange(g.size), cnt)
      i = olo[node] + (np.arange(node.size) - starts[node])
      gn = g[node]
      val = D[gn, i - 1] + cost(gn, i, mid[node])
      mins = np.minimum.reduceat(val, starts)
      pos = np.where(val <= mins[node], np.arange(val.size), val.size)
      best = i[np.minimum.reduceat(pos, starts)]
      D_new[g, mid] = mins
      opt[k, g, mid] = best
      left, right = jlo < mid, mid < jhi
      g = np.concatenate([g[left], g[right]])
      jlo, jhi = (np.concatenate([jlo[left], mid[right] + 1]),
                  np.concatenate([mid[left] - 1, jhi[right]]))
      olo, ohi = (np.concatenate([olo[left], best[right]]),
                  np.concatenate([best[left], ohi[right]]))
    D = D_new
  return opt


def _optimal_chunk(points, weights, k_active, K, objective):
  G, M = points.shape
  cost = _RangeCost(points, weights, objective)
  opt = _best_splits(cost, G, M, k_active, K)
  groups = np.arange(G)
  j = np.full(G, M - 1)
  centroids = np.zeros((G, K))
  for k in range(K - 1, -1, -1):
    has = k < k_active
    i = opt[k, groups, j] if k > 0 else np.zeros(G, np.int64)
    centroids[:, k] = np.where(has, cost.centroid(groups, i, j), 0.0)
    j = np.where(has, i - 1, j)
  return centroids


def optimal_centroids(x, h, group_sizes: Sequence[int], k_active, *, K: int,
                      objective: str = "l2", bins: int = 4096,
                      exact_max_points: int = 4096) -> np.ndarray:
  """Optimal centroids (G, K) per group; slots >= k_active[g] are unspecified."""
  x = np.asarray(x, np.float64)
  h = np.asarray(h, np.float64)
  k_active = np.asarray(k_active, np.int64)
  points, weights = _group_points(x, h, group_sizes, bins, exact_max_points)
  G, M = points.shape
  if M < K:  # fewer support points than clusters: pad with empty points
    points = np.concatenate([points, np.repeat(points[:, -1:], K - M, axis=1)], axis=1)
    weights = np.concatenate([weights, np.zeros((G, K - M))], axis=1)
    M = K
  chunk = max(1, _MAX_TABLE_ENTRIES // (K * M))
  out = np.zeros((G, K))
  for s in range(0, G, chunk):
    sl = slice(s, s + chunk)
    out[sl] = _optimal_chunk(points[sl], weights[sl], k_active[sl], K, objective)
  return out.astype(np.float32)


def _batched_optimal_centroids(xc, h, group_sizes, k_active, *, K, **options):
  """:func:`optimal_centroids` over leading batch axes (from ``jax.vmap``): the
  groups of every batch element go through one DP as extra groups."""
  batch = np.shape(xc)[:-1]
  if not batch:
    return optimal_centroids(xc, h, group_sizes, k_active, K=K, **options)
  G = np.shape(group_sizes)[-1]
  flat = lambda a: np.broadcast_to(a, batch + np.shape(a)[-1:]).reshape(-1)
  out = optimal_centroids(flat(xc), flat(h), flat(group_sizes), flat(k_active), K=K, **options)
  return out.reshape(batch + (G, K))


def _optimal_centroids_callback(xc, h, group_sizes, k_active, K, objective, bins,
                               exact_max_points):
  """:func:`optimal_centroids` as a host callback usable under ``jax.jit`` and
  ``jax.vmap`` (a batch is solved in one call, its groups side by side)."""
  fn = functools.partial(_batched_optimal_centroids, K=K, objective=objective, bins=bins,
                         exact_max_points=exact_max_points)
  shape = jax.ShapeDtypeStruct((group_sizes.shape[0], K), jnp.float32)
  return jax.pure_callback(fn, shape, xc, h, group_sizes, k_active,
                           vmap_method="broadcast_all")
