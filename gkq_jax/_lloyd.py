"""Lloyd iterations for grouped 1-D k-means: on the histogram and on the values.

Both share one convergence loop (:func:`iterate`): a group stops after
``max_iter`` updates or once none of its centroids moved more than ``tol`` x
its value range, and is then left alone, so every group follows the same
steps as it would clustered on its own. For scalars the importance never
changes which centroid is nearest, so assignment is a comparison with sorted
midpoints and no N x K distance matrix is ever built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gkq_jax import _histogram as hist_lib
from gkq_jax import _rows


def iterate(update, c, active, half_range, max_iter, tol):
  """Applies ``update(c) -> c`` to every group until it converged."""

  def cond(state):
    it, _, done = state
    return jnp.logical_and(it < max_iter, jnp.logical_not(jnp.all(done)))

  def body(state):
    it, c, done = state
    new = jnp.where(done[:, None], c, update(c))
    delta = jnp.where(active, jnp.abs(new - c), 0.0).max(axis=1)
    return it + 1, new, done | (delta <= tol * 2 * half_range)

  done = jnp.zeros(c.shape[0], bool)
  return jax.lax.while_loop(cond, body, (0, c, done))[1]


def _monotone(c, active):
  """Unused slots at +inf, and sorted: rounding can swap two means by an ulp."""
  return jax.lax.cummax(jnp.where(active, c, jnp.inf), axis=1)


# ------------------------------------------------------------ on the histogram


def _hist_edges(c, hist):
  """Bins [e_k, e_{k+1}) belong to cluster k: those whose mean is at most the
  midpoint above it. Bins are evenly spaced, so the bin holding a midpoint is
  arithmetic, and its own mean settles which side it goes to."""
  G = c.shape[0]
  mid = (c[:, :-1] + c[:, 1:]) / 2
  half, bins = hist.half_range[:, None], hist.bins[:, None]
  b = hist_lib.bin_index(jnp.clip(mid, -half, half), half, hist_lib.bin_scale(half, bins), bins)
  inner = b + (hist_lib.bin_mean(hist, b) <= mid).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((G, 1), jnp.int32), inner, bins], axis=1)


def hist_update(c, hist, objective, active, max_bins):
  """One Lloyd step over whole bins: O(K) per group from the running sums."""
  edges = _hist_edges(c, hist)
  base = hist.base[:, None]
  w0 = hist_lib.prefix(hist.cum_weight, base, edges)
  w = w0[:, 1:] - w0[:, :-1]
  if objective == "l2":
    s0 = hist_lib.prefix(hist.cum_moment, base, edges)
    new = (s0[:, 1:] - s0[:, :-1]) / jnp.where(w > 0, w, 1.0)
  else:  # the weighted median: the bin where half the cluster's mass is reached
    b = hist_lib.search(hist.cum_weight, hist.base, hist.bins, w0[:, :-1] + w / 2, max_bins)
    new = hist_lib.bin_mean(hist, b)
  return _monotone(jnp.where(w > 0, new, c), active)


def hist_lloyd(c, hist, objective, active, max_bins, max_iter, tol):
  return iterate(lambda c: hist_update(c, hist, objective, active, max_bins), c, active,
                 hist.half_range, max_iter, tol)


# ---------------------------------------------------------------- on the values


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


def data_update(plan, arrays, frame, x, h, c, objective, active, axis_name=None):
  """Centroids of the nearest-centroid partition: weighted means (l2) or medians
  (l1; not for groups split over devices, ``axis_name``)."""
  G, K = c.shape
  if objective == "l2":
    w, s = _rows.cluster_sums(plan, arrays, frame, x, h, c, axis_name)
    new = jnp.where(w > 0, s / jnp.where(w > 0, w, 1.0), c)
  else:  # the rarely used l1 refinement sorts all values once per step
    seg = jnp.repeat(jnp.arange(G), arrays.group_size, total_repeat_length=plan.num_values)
    a = _rows.assign(plan, arrays, frame, x, h, c)
    hu = jnp.where(frame.uniform[seg], 1.0, h)
    med, nonempty = _weighted_medians(x - frame.center[seg], hu, seg * K + a, G * K)
    new = jnp.where(nonempty.reshape(G, K), med.reshape(G, K), c)
  return _monotone(new, active)


def data_lloyd(plan, arrays, frame, x, h, c, objective, active, max_iter, tol, axis_name=None):
  return iterate(lambda c: data_update(plan, arrays, frame, x, h, c, objective, active,
                                       axis_name), c, active, frame.half_range, max_iter, tol)
