"""Lloyd iterations for grouped 1-D k-means: on the histogram and on the values.

Both share one convergence loop (:func:`iterate`): stop after ``max_iter``
updates or when no centroid of any group moved more than ``tol`` x that
group's value range. For scalars the importance never changes which centroid
is nearest, so assignment is a search over sorted midpoints and no N x K
distance matrix is ever built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gkq_jax import _histogram as hist_lib


def iterate(update, c, active, frame, max_iter, tol):
  """Applies ``update(c) -> c`` until converged (see the module docstring)."""

  def cond(state):
    it, _, done = state
    return jnp.logical_and(it < max_iter, jnp.logical_not(done))

  def body(state):
    it, c, _ = state
    new = update(c)
    delta = jnp.where(active, jnp.abs(new - c), 0.0).max(axis=1)
    return it + 1, new, jnp.all(delta <= tol * 2 * frame.half_range)

  _, c, _ = jax.lax.while_loop(cond, body, (0, c, jnp.asarray(max_iter <= 0)))
  return c


# ------------------------------------------------------------ on the histogram


def _hist_edges(c, bin_centers):
  """Bins [e_k, e_{k+1}) belong to cluster k: bin centers below the midpoint."""
  mid = (c[:, :-1] + c[:, 1:]) / 2
  inner = jax.vmap(lambda m, v: jnp.searchsorted(v, m, side="right"))(mid, bin_centers)
  G, B = bin_centers.shape
  return jnp.concatenate([jnp.zeros((G, 1), jnp.int32), inner.astype(jnp.int32),
                          jnp.full((G, 1), B, jnp.int32)], axis=1)


def hist_update(c, hist, means, objective, active):
  """One Lloyd step over whole bins: O(K log B) per group from the cumulative sums."""
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


def hist_lloyd(c, hist, objective, active, frame, max_iter, tol):
  means = hist_lib.bin_means(hist)
  return iterate(lambda c: hist_update(c, hist, means, objective, active), c, active, frame,
                 max_iter, tol)


# ---------------------------------------------------------------- on the values


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
  left = hist.bin_centers - half_width
  right = hist.bin_centers + half_width
  search = jax.vmap(lambda m, v: jnp.searchsorted(m, v, side="left"))
  a_left = search(mid[:, 1:K], left).astype(jnp.int32)
  a_right = search(mid[:, 1:K], right).astype(jnp.int32)
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


def data_update(xc, h, a, c, frame, objective, active):
  """Centroids of the assignment ``a``: weighted means (l2) or medians (l1)."""
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


def data_lloyd(xc, h, c, frame, hist, objective, active, max_iter, tol):
  def update(c):
    return data_update(xc, h, assign_nearest(xc, c, frame, hist), c, frame, objective, active)

  return iterate(update, c, active, frame, max_iter, tol)
