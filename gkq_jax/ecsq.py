"""Entropy-constrained clustering (ECSQ) and uniform quantization of grouped 1-D values.

Both aim at the size of the *entropy-coded* indices, not at a number of
clusters. Values are laid out as in :func:`gkq_jax.grouped_kmeans_1d`: one
flat array in which every group (a layer) is a contiguous slice, all groups
in one compiled call.

ECSQ (Chou, Lookabaugh & Gray 1989; importance-weighted as in Choi, El-Khamy
& Lee 2017) minimises, per group,

    J = sum_i h_i (x_i - c_{a_i})^2 + lam * sum_i -log2 p_{a_i}

with p_j the share of the group's values in cluster j, so the second sum is
the ideal coded size of the indices in bits and ``lam`` prices one bit in
units of weighted distortion. The Lloyd-like iteration alternates the
assignment that minimises distortion plus ``lam`` x code length (a running
argmin over the K clusters: O(NK) work, O(N) memory) with importance-weighted
mean centroids and the new shares; neither step can increase J. A cluster
that loses all its members gets an infinite code length and stays empty, so
``lam`` also decides how many clusters survive. With ``lam = 0`` it is
Lloyd's weighted k-means. Unimportant weights have cheap distortion and
drift to the most probable (cheapest) cluster: with ``pin_zero`` (cluster 0
held at exactly 0, the slot pruned weights use) ECSQ prunes as it quantizes.

Uniform quantization (Choi et al.'s strongest simple baseline): cells of one
width with 0 a cell centre, each represented by the importance-weighted
mean of its members, then entropy coding.

:func:`ecsq_for_rate` and :func:`uniform_for_rate` find ``lam`` / the cell
width for a target number of bits per weight by bisection (no recompilation:
both are traced arguments).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gkq_jax import _histogram as hist_lib
from gkq_jax._clustering import check_finite, check_nonnegative
from gkq_jax.kmeans1d import grouped_kmeans_1d

MAX_CELLS = 256  # uniform quantization: cells per group (uint8 indices)


class EntropyClustering(NamedTuple):
  """Codebooks and assignments plus what the rate targets need.

  centroids (G, K) sorted per group (with ``pin_zero``: the exact zero first,
  then the others sorted), entries from ``num_used`` on repeating the last
  used one; assignments (N,) int32 into the group's row; num_used (G,)
  clusters that hold values (the pinned zero always counts); entropy_bits
  (G,) ideal coded size of the group's indices, sum_j n_j log2(n / n_j),
  pinned zeros included; distortion (G,) sum_i h_i (x_i - c_{a_i})^2.
  """

  centroids: jax.Array
  assignments: jax.Array
  num_used: jax.Array
  entropy_bits: jax.Array
  distortion: jax.Array


# ------------------------------------------------------------------- shared steps


def _stats(x, h, a, seg, G, K):
  """Count, importance mass and importance-weighted sum of each (group, cluster)."""
  stats = jax.ops.segment_sum(jnp.stack([jnp.ones_like(h), h, h * x], -1), seg * K + a, G * K)
  return (stats[:, 0].reshape(G, K), stats[:, 1].reshape(G, K), stats[:, 2].reshape(G, K))


def _entropy_bits(counts):
  """sum_j n_j log2(n / n_j) per group (0 log 0 = 0)."""
  total = counts.sum(axis=1, keepdims=True)
  safe = jnp.where(counts > 0, counts, 1.0)
  return jnp.sum(jnp.where(counts > 0, counts * jnp.log2(total / safe), 0.0), axis=1)


def _distortion(x, h, c, a, seg, G):
  K = c.shape[1]
  err = x - c.reshape(-1)[seg * K + a]
  return jax.ops.segment_sum(h * err * err, seg, G, indices_are_sorted=True)


def _compact(c, counts, a, seg, pin):
  """Drops empty clusters and sorts the rest (a pinned zero stays at index 0)."""
  G, K = c.shape
  used = (counts > 0).at[:, 0].set((counts[:, 0] > 0) | pin)
  key = jnp.where(used, c, jnp.inf)
  key = key.at[:, 0].set(jnp.where(pin, -jnp.inf, key[:, 0]))
  order = jnp.argsort(key, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1, stable=True).astype(jnp.int32)
  c = jnp.take_along_axis(c, order, axis=1)
  counts = jnp.take_along_axis(counts, order, axis=1)
  num_used = used.sum(axis=1).astype(jnp.int32)
  last = jnp.take_along_axis(c, jnp.maximum(num_used - 1, 0)[:, None], axis=1)
  c = jnp.where(jnp.arange(K)[None, :] < num_used[:, None], c, last)
  return c, rank.reshape(-1)[seg * K + a], num_used, counts


# ------------------------------------------------------------------------- ECSQ


def _penalty(counts, active, lam):
  """lam x code length of every cluster; inf where a value may not go.

  With lam > 0 an empty cluster has an infinite code length (it is dead);
  with lam = 0 it is plain k-means, where an empty cluster may win values back.
  """
  total = counts.sum(axis=1, keepdims=True)
  bits = -jnp.log2(jnp.where(counts > 0, counts, 1.0) / jnp.maximum(total, 1.0))
  lam = lam[:, None]
  allowed = active & ((counts > 0) | (lam == 0))
  return jnp.where(allowed, jnp.where(lam > 0, lam * bits, 0.0), jnp.inf)


def _assign(x, h, c, penalty, seg):
  """argmin_j h_i (x_i - c_j)^2 + penalty_j, ties to the nearer centroid."""
  c_t, pen_t = c.T, penalty.T  # (K, G): one row per cluster

  def body(j, carry):
    best_cost, best_d, best_j = carry
    d = (x - c_t[j][seg]) ** 2
    cost = h * d + pen_t[j][seg]
    better = (cost < best_cost) | ((cost == best_cost) & (d < best_d))
    return (jnp.where(better, cost, best_cost), jnp.where(better, d, best_d),
            jnp.where(better, j, best_j))

  inf = jnp.full_like(x, jnp.inf)
  return jax.lax.fori_loop(0, c.shape[1], body, (inf, inf, jnp.zeros(x.shape, jnp.int32)))[2]


def _pin(c, n, pin, pinned):
  """Cluster 0 of the pinned groups: exactly 0, plus the pruned values outside x."""
  return (c.at[:, 0].set(jnp.where(pin, 0.0, c[:, 0])),
          n.at[:, 0].add(jnp.where(pin, pinned, 0.0)))


@functools.partial(jax.jit, static_argnames=("num_groups",))
def _ecsq(x, h, c, k_active, lam, pin, pinned, seg, max_iter, tol, *, num_groups):
  G, K = c.shape
  active = jnp.arange(K)[None, :] < k_active[:, None]

  def step(c, counts):
    a = _assign(x, h, c, _penalty(counts, active, lam), seg)
    n, w, s = _stats(x, h, a, seg, G, K)
    new, n = _pin(jnp.where(w > 0, s / jnp.where(w > 0, w, 1.0), c), n, pin, pinned)
    objective = _distortion(x, h, new, a, seg, G) + lam * _entropy_bits(n)
    return a, new, n, objective

  # Equal shares at the start: the first assignment is the nearest centroid.
  a, c, counts, objective = step(c, active.astype(x.dtype))

  def cond(state):
    it, _, _, _, before, after = state
    progress = (it == 1) | jnp.any(before - after > tol * jnp.abs(before))
    return (it < max_iter) & progress

  def body(state):
    it, _, c, counts, _, objective = state
    a, c, counts, new_objective = step(c, counts)
    return it + 1, a, c, counts, objective, new_objective

  state = (jnp.asarray(1), a, c, counts, jnp.full_like(objective, jnp.inf), objective)
  _, a, c, counts, _, objective = jax.lax.while_loop(cond, body, state)
  c, a, num_used, counts = _compact(c, counts, a, seg, pin)
  return EntropyClustering(c, a, num_used, _entropy_bits(counts),
                           _distortion(x, h, c, a, seg, num_groups))


def _check_inputs(values, importance, group_sizes):
  group_sizes = tuple(int(s) for s in group_sizes)
  if not group_sizes or min(group_sizes) < 1:
    raise ValueError(f"group_sizes must be positive, got {group_sizes[:8]}.")
  values = jnp.asarray(values, jnp.float32)
  if values.ndim != 1 or values.shape[0] != sum(group_sizes):
    raise ValueError(f"values must be 1-D with sum(group_sizes)={sum(group_sizes)} entries, "
                     f"got shape {values.shape}.")
  importance = (jnp.ones_like(values) if importance is None
                else jnp.asarray(importance, jnp.float32))
  if importance.shape != values.shape:
    raise ValueError(f"importance has shape {importance.shape}, values {values.shape}; "
                     "they must match.")
  check_finite("values", values)
  check_finite("importance", importance)
  check_nonnegative("importance", importance)
  return values, importance, group_sizes


def _per_group(name, value, num_groups, dtype=np.float64):
  array = np.broadcast_to(np.asarray(value, dtype), (num_groups,))
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} must be finite, got {value}.")
  return array


def _pins(pin_zero, pinned_zeros, num_groups):
  """(pin per group, pruned values per group) from the user's arguments."""
  pin = np.broadcast_to(np.asarray(pin_zero, bool), (num_groups,))
  if pinned_zeros is None:
    return pin, np.zeros(num_groups)
  pinned = _per_group("pinned_zeros", pinned_zeros, num_groups)
  if pinned.min() < 0 or np.any((pinned > 0) & ~pin):
    raise ValueError("pinned_zeros must be >= 0 and only where pin_zero is True (pruned "
                     "values sit on the pinned zero).")
  return pin, pinned


def _kmeans_start(values, importance, group_sizes, k, pin, key, kmeans_options):
  """Weighted k-means codebooks (G, max k); a pinned group's row starts with 0."""
  own = np.maximum(k - pin, 1)
  c = np.asarray(grouped_kmeans_1d(values, importance, group_sizes, own, key=key,
                                   **kmeans_options).centroids)
  K = int(k.max())
  padded = np.concatenate([c, np.repeat(c[:, -1:], K, axis=1)], axis=1)
  shifted = np.concatenate([np.zeros((len(k), 1), c.dtype), padded], axis=1)
  return jnp.asarray(np.where(pin[:, None], shifted[:, :K], padded[:, :K]))


def grouped_ecsq_1d(values, importance, group_sizes: Sequence[int], num_clusters, lam, *,
                    pin_zero=False, pinned_zeros=None, init_centroids=None,
                    max_iter: int = 100, tol: float = 1e-7, key=None,
                    **kmeans_options) -> EntropyClustering:
  """Entropy-constrained importance-weighted clustering of each group.

  Args:
    values: (N,) floats, groups as contiguous slices (see ``group_sizes``).
    importance: (N,) non-negative weights h (e.g. mean g^2), or None (all 1).
    group_sizes: static positive sizes summing to N.
    num_clusters: clusters each group starts with (int or one per group); the
      entropy term empties some of them. A pinned zero is one of them.
    lam: price of one bit in weighted distortion, >= 0 (scalar or one per
      group; traced, so new values do not recompile). 0 gives weighted k-means.
    pin_zero: bool, or one per group: cluster 0 is held at exactly 0 (the
      slot of pruned weights); values whose distortion costs less than their
      code length go there.
    pinned_zeros: per group, how many values outside ``values`` sit on the
      pinned zero (pruned weights): they make its code shorter.
    init_centroids: (G, K) starting codebooks; default: weighted k-means of
      each group (``grouped_kmeans_1d`` with ``kmeans_options``), after a
      zero for pinned groups.
    max_iter, tol: stop after ``max_iter`` iterations or when no group's
      objective fell by more than ``tol`` x its value.
    key: PRNG key of the k-means start.

  Returns:
    :class:`EntropyClustering`.
  """
  values, importance, group_sizes = _check_inputs(values, importance, group_sizes)
  G = len(group_sizes)
  lam = _per_group("lam", lam, G)
  if lam.min() < 0:
    raise ValueError(f"lam must be >= 0 (it prices one bit of code length), got {lam.min()}.")
  pin, pinned = _pins(pin_zero, pinned_zeros, G)
  k = np.broadcast_to(np.asarray(num_clusters, np.int64), (G,))
  if np.any(k < 1 + pin):
    raise ValueError(f"num_clusters must be >= 1, and >= 2 with pin_zero (the zero + one "
                     f"value), got {k.min()}.")
  if max_iter < 1 or tol < 0:
    raise ValueError(f"max_iter must be >= 1 and tol >= 0, got {max_iter} and {tol}.")
  K = int(k.max())
  if init_centroids is None:
    start = _kmeans_start(values, importance, group_sizes, k, pin, key, kmeans_options)
  else:
    start = jnp.asarray(init_centroids, jnp.float32)
    if start.shape != (G, K):
      raise ValueError(f"init_centroids must have shape (groups, max clusters) = {(G, K)}, "
                       f"got {start.shape}.")
  return _ecsq(values, importance, start, jnp.asarray(k, jnp.int32),
               jnp.asarray(lam, jnp.float32), jnp.asarray(pin), jnp.asarray(pinned, jnp.float32),
               hist_lib.group_ids(group_sizes), jnp.asarray(max_iter, jnp.int32),
               jnp.asarray(tol, jnp.float32), num_groups=G)


def ecsq_1d(values, importance=None, num_clusters: int = 32, lam: float = 0.0,
            **kwargs) -> EntropyClustering:
  """ECSQ of one array of any shape: centroids (K,), assignments like ``values``."""
  values = jnp.asarray(values)
  flat_h = None if importance is None else jnp.asarray(importance).reshape(-1)
  out = grouped_ecsq_1d(values.reshape(-1), flat_h, (values.size,), num_clusters, lam, **kwargs)
  return out._replace(centroids=out.centroids[0],
                      assignments=out.assignments.reshape(values.shape))


def ecsq_objective(values, importance, centroids, assignments, lam, pinned_zeros: int = 0):
  """J of one group: sum h (x - c_a)^2 + lam x (entropy-coded bits of the indices).

  ``pinned_zeros`` extra values sit in cluster 0 (outside ``values``).
  """
  x = np.asarray(values, np.float64).reshape(-1)
  a = np.asarray(assignments).reshape(-1)
  h = np.ones_like(x) if importance is None else np.asarray(importance, np.float64).reshape(-1)
  c = np.asarray(centroids, np.float64)
  counts = np.bincount(a, minlength=c.size).astype(np.float64)
  counts[0] += pinned_zeros
  nz = counts[counts > 0]
  return float(np.sum(h * (x - c[a]) ** 2) + lam * np.sum(nz * np.log2(counts.sum() / nz)))


# ------------------------------------------------------------------------ uniform


@functools.partial(jax.jit, static_argnames=("num_groups",))
def _uniform(x, h, step, pin, pinned, seg, *, num_groups):
  G, K = num_groups, MAX_CELLS + 1
  cell = jnp.round(x / step[seg])
  lo = jax.ops.segment_min(cell, seg, G, indices_are_sorted=True)
  # Slot 0 is reserved for the pinned zero; cells lo, lo + 1, ... follow.
  a = jnp.where(pin[seg] & (cell == 0), 0, (cell - lo[seg]).astype(jnp.int32) + 1)
  n, w, s = _stats(x, h, a, seg, G, K)
  centres = (lo[:, None] + jnp.arange(K)[None, :] - 1) * step[:, None]
  c, n = _pin(jnp.where(w > 0, s / jnp.where(w > 0, w, 1.0), centres), n, pin, pinned)
  c, a, num_used, counts = _compact(c, n, a, seg, pin)
  return EntropyClustering(c, a, num_used, _entropy_bits(counts),
                           _distortion(x, h, c, a, seg, num_groups))


def _range_per_group(values, group_sizes):
  x = np.asarray(values)
  starts = np.concatenate([[0], np.cumsum(group_sizes)[:-1]])
  lo, hi = np.minimum.reduceat(x, starts), np.maximum.reduceat(x, starts)
  return np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)


def grouped_uniform_1d(values, importance, group_sizes: Sequence[int], step, *,
                       pin_zero=False, pinned_zeros=None) -> EntropyClustering:
  """Uniform cells of width ``step`` (0 a cell centre), represented by the
  importance-weighted mean of their members.

  ``step`` (scalar or one per group, traced) is raised where needed so that a
  group spans at most ``MAX_CELLS - 1`` cells. In pinned groups (``pin_zero``)
  the cell around 0 is held at exactly 0 and is index 0; ``pinned_zeros`` as
  in :func:`grouped_ecsq_1d`.
  """
  values, importance, group_sizes = _check_inputs(values, importance, group_sizes)
  G = len(group_sizes)
  step = _per_group("step", step, G)
  if step.min() <= 0:
    raise ValueError(f"step must be > 0, got {step.min()}.")
  pin, pinned = _pins(pin_zero, pinned_zeros, G)
  # Cells -m..m with m = round(max |x| / step) <= 127: at most 255 cells.
  step = np.maximum(step, _range_per_group(values, group_sizes) / ((MAX_CELLS - 2) // 2 - 0.5))
  return _uniform(values, importance, jnp.asarray(step, jnp.float32), jnp.asarray(pin),
                  jnp.asarray(pinned, jnp.float32), hist_lib.group_ids(group_sizes),
                  num_groups=G)


# ------------------------------------------------------------------ rate targets


def _bisect_log(run: Callable[[float], tuple], rate_of: Callable, target: float, lo: float,
                hi: float, *, lo_floor: float | None = None, iters: int = 40,
                rtol: float = 2e-3):
  """The smallest parameter in [lo, hi] whose rate is <= target, by bisection
  on a log scale (from ``lo_floor`` when ``lo`` is 0).

  ``run(p)`` gives a result and ``rate_of(result)`` its rate, which falls as
  p grows. Returns (p, result), or (None, result at hi) when even hi is over.
  """
  out = run(lo)
  if rate_of(out) <= target:
    return lo, out
  best = run(hi)
  if rate_of(best) > target:
    return None, best
  lo = lo if lo > 0 else lo_floor
  p_hi = hi
  for _ in range(iters):
    mid = float(np.sqrt(lo * p_hi))
    out = run(mid)
    rate = rate_of(out)
    if rate <= target:
      p_hi, best = mid, out
      if rate >= target * (1 - rtol):
        break
    else:
      lo = mid
    if p_hi / lo < 1 + 1e-6:
      break
  return p_hi, best


def _weighted_spread(values, importance, group_sizes):
  """Mean over values of h (x - group's weighted mean)^2: the scale of lam."""
  x, h = np.asarray(values, np.float64), np.asarray(importance, np.float64)
  starts = np.concatenate([[0], np.cumsum(group_sizes)[:-1]])
  mass = np.add.reduceat(h, starts)
  mean = np.add.reduceat(h * x, starts) / np.where(mass > 0, mass, 1.0)
  spread = np.sum(h * (x - np.repeat(mean, group_sizes)) ** 2) / x.size
  return spread if spread > 0 else 1.0


def _bits_per_weight(group_sizes, pinned_zeros):
  total = float(np.sum(group_sizes)) + float(np.sum(pinned_zeros))
  return lambda out: float(np.sum(np.asarray(out.entropy_bits, np.float64))) / total


def _check_target(bits_per_weight):
  if not np.isfinite(bits_per_weight) or bits_per_weight <= 0:
    raise ValueError(f"bits_per_weight must be a positive number, got {bits_per_weight}.")


def ecsq_for_rate(values, importance, group_sizes: Sequence[int], bits_per_weight: float, *,
                  num_clusters=32, pin_zero=False, pinned_zeros=None,
                  max_iter: int = 100, tol: float = 1e-7, key=None,
                  **kmeans_options) -> tuple[EntropyClustering, float]:
  """ECSQ with one ``lam`` for all groups, found by bisection so that the
  entropy of the indices is at most ``bits_per_weight`` on average (pinned
  zeros included). One lam for every group puts them all at the same
  distortion-rate slope: the Lagrangian optimum of the split of bits across
  groups. Returns (result, lam); lam = 0 when k-means already fits."""
  _check_target(bits_per_weight)
  values, importance, group_sizes = _check_inputs(values, importance, group_sizes)
  G = len(group_sizes)
  pin, pinned = _pins(pin_zero, pinned_zeros, G)
  k = np.broadcast_to(np.asarray(num_clusters, np.int64), (G,))
  start = _kmeans_start(values, importance, group_sizes, k, pin, key, kmeans_options)
  rate_of = _bits_per_weight(group_sizes, pinned)
  run = lambda lam: grouped_ecsq_1d(values, importance, group_sizes, k, lam, pin_zero=pin,
                                    pinned_zeros=pinned, init_centroids=start,
                                    max_iter=max_iter, tol=tol)
  scale = _weighted_spread(values, importance, group_sizes)
  lam, out = _bisect_log(run, rate_of, bits_per_weight, 0.0, scale * 64, lo_floor=scale * 1e-9)
  if lam is None:
    raise ValueError(f"bits_per_weight={bits_per_weight} is below the smallest rate ECSQ "
                     f"reaches here ({rate_of(out):.4f} bits per weight); raise it.")
  return out, lam


def _slope_scale(importance, group_sizes, equal_slope):
  """Per-group cell width factor 1 / sqrt(mean importance), or all ones."""
  if not equal_slope:
    return np.ones(len(group_sizes))
  starts = np.concatenate([[0], np.cumsum(group_sizes)[:-1]])
  mean_h = np.add.reduceat(np.asarray(importance, np.float64), starts) / np.asarray(group_sizes)
  fallback = mean_h.max() if mean_h.max() > 0 else 1.0
  return 1 / np.sqrt(np.where(mean_h > 0, mean_h, fallback))


def uniform_for_rate(values, importance, group_sizes: Sequence[int], bits_per_weight: float, *,
                     equal_slope: bool = True, pin_zero=False,
                     pinned_zeros=None) -> tuple[EntropyClustering, float]:
  """Uniform quantization whose index entropy is at most ``bits_per_weight``
  on average, by bisection on the cell width. With ``equal_slope`` group g's
  width is t / sqrt(mean importance of g) (equal distortion-rate slopes at
  high rate); otherwise one width t for all. Returns (result, t)."""
  _check_target(bits_per_weight)
  values, importance, group_sizes = _check_inputs(values, importance, group_sizes)
  pin, pinned = _pins(pin_zero, pinned_zeros, len(group_sizes))
  scale = _slope_scale(importance, group_sizes, equal_slope)
  rate_of = _bits_per_weight(group_sizes, pinned)
  run = lambda t: grouped_uniform_1d(values, importance, group_sizes, t * scale, pin_zero=pin,
                                     pinned_zeros=pinned)
  widest = float(np.max(_range_per_group(values, group_sizes) / scale)) * 4 + 1e-30
  t, out = _bisect_log(run, rate_of, bits_per_weight, widest * 1e-6, widest)
  if t is None:
    raise ValueError(f"bits_per_weight={bits_per_weight} is below the smallest rate uniform "
                     f"quantization reaches here ({rate_of(out):.4f}); raise it.")
  return out, t
