"""Importance-weighted k-means of scalar values, many groups in one compiled call.

All values live in one flat array in which every group (a layer, an output
channel, a whole model) is a contiguous slice; ``group_sizes`` gives the slices.
Each group gets its own codebook of at most ``num_clusters[g]`` values, padded
to a common static ``K`` so that one compilation serves every group.

The objective of group g is ``sum_i h_i (x_i - c_{a_i})^2`` (``objective="l2"``,
centroid = importance-weighted mean) or ``sum_i h_i |x_i - c_{a_i}|`` (``"l1"``,
the seed's literal criterion, centroid = weighted median).

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
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gkq_jax import _distinct, _inits, _layout, _lloyd, _rows, exact1d
from gkq_jax import _histogram as hist_lib
from gkq_jax._clustering import Clustering, check_finite, check_nonnegative, is_traced

METHODS = ("hist", "lloyd", "exact")
INITS = tuple(_inits.INITS)
OBJECTIVES = ("l2", "l1")

_EXACT_BINS = 4096
EXACT_UP_TO = 256
MIN_BINS = 16


@functools.partial(
    jax.jit,
    static_argnames=("plan", "K", "method", "init", "objective", "max_iter", "tol",
                     "exact_bins", "refine_iters", "exact_max_points", "small_widths",
                     "axis_name"))
def _grouped_kmeans(x, h, k_active, key, arrays, tiny, small, rest=None, *, plan, K, method, init,
                    objective, max_iter, tol, exact_bins, refine_iters, exact_max_points,
                    small_widths, axis_name=None):
  # axis_name: inside shard_map, every group's values are split over the devices of
  # that mesh axis; their stats, histograms and Lloyd sums are summed across them.
  lo, hi, mass = _rows.group_stats(plan, arrays, x, h, axis_name)
  # A group whose importance is all zero is clustered with uniform weights.
  frame = hist_lib.Frame((lo + hi) / 2, (hi - lo) / 2, mass <= 0)
  active = jnp.arange(K)[None, :] < k_active[:, None]

  if method == "exact":
    seg = jnp.repeat(jnp.arange(plan.num_groups), arrays.group_size,
                     total_repeat_length=plan.num_values)
    c = exact1d._optimal_centroids_callback(
        x - frame.center[seg], jnp.where(frame.uniform[seg], 1.0, h), arrays.group_size,
        k_active, K, objective, exact_bins, exact_max_points)
    c = jnp.where(active, c, jnp.inf)
  else:
    k_init, _ = jax.random.split(key)
    hist = _rows.histogram(plan, arrays, frame, x, h, axis_name)
    inputs = _inits.InitInputs(hist, k_active, K, plan.max_bins, k_init, objective, x,
                               arrays.group_start, arrays.group_size, frame.center)
    if rest is None:
      c = _inits.start(init, inputs, active)
      if method == "hist":
        c = _lloyd.hist_lloyd(c, hist, objective, active, plan.max_bins, max_iter, tol)
    else:  # the groups that take the exact DP below need no histogram start of their own
      c = jnp.zeros((plan.num_groups, K), jnp.float32)
      if rest.shape[0]:
        c = c.at[rest].set(_start_some(init, method, inputs, active, rest, plan.max_bins,
                                       max_iter, tol))
  for width, groups in zip(small_widths, small):  # the DP start, exact here
    c = _exact_small(c, x, h, frame, arrays, groups, width, k_active, K)
  c = _exact_small_groups(c, x, frame, arrays, tiny, active)

  lloyd_iters = max_iter if method == "lloyd" else refine_iters
  lloyd_tol = tol if method == "lloyd" else 0.0
  c = _lloyd.data_lloyd(plan, arrays, frame, x, h, c, objective, active, lloyd_iters, lloyd_tol,
                        axis_name)
  a = _rows.assign(plan, arrays, frame, x, h, c)
  # Pad inactive slots with the largest active centroid: a group never holds
  # more distinct values than it asked for, and nothing is infinite.
  last = jnp.take_along_axis(c, jnp.maximum(k_active - 1, 0)[:, None], axis=1)
  c = jnp.where(active, c, last)
  return Clustering(c + frame.center[:, None], a)


def _start_some(init, method, inputs, active, groups, max_bins, max_iter, tol):
  """The histogram start (and Lloyd on the histogram) of some groups only."""
  hist = inputs.hist.take(groups)
  part = inputs._replace(hist=hist, k_active=inputs.k_active[groups],
                         start=inputs.start[groups], size=inputs.size[groups],
                         center=inputs.center[groups])
  c = _inits.start(init, part, active[groups])
  if method == "hist":
    c = _lloyd.hist_lloyd(c, hist, inputs.objective, active[groups], max_bins, max_iter, tol)
  return c


def _exact_small(c, x, h, frame, arrays, small, width, k_active, K):
  """The optimal centroids of small groups (at most ``width`` values each,
  indices ``small``): the full DP over their sorted values, O(K n^2) a group,
  a batch of groups at a time (their tables bound the memory, not the values).

  Range costs come from float32 running sums over the group's centred values;
  that is exact enough unless clusters hold one or two values next to far
  outliers (K close to the group's size), where costs below ~1e-7 of the
  group's total are lost."""
  slot = jnp.arange(width)

  def one_group(g, k_active):
    size = arrays.group_size[g]
    real = slot < size
    at = arrays.group_start[g] + jnp.minimum(slot, size - 1)
    xc = x[at] - frame.center[g]
    w = jnp.where(real, jnp.where(frame.uniform[g], 1.0, h[at]), 0.0)
    # Padding sorts last: the group's largest value at no weight.
    xc = jnp.where(real, xc, jnp.max(jnp.where(real, xc, -jnp.inf)))
    xs, ws = jax.lax.sort((xc, w), num_keys=1)
    zero = jnp.zeros(1)
    sums = tuple(jnp.concatenate([zero, jnp.cumsum(a)]) for a in (ws, ws * xs, ws * xs * xs))
    # Positions past the group's own values are its end: one position per value.
    at_end = jnp.minimum(jnp.arange(width + 1), size)
    t = _inits.coarse_bounds(tuple(a[at_end] for a in sums), k_active, K)
    W, S = sums[0][at_end[t]], sums[1][at_end[t]]
    mass = jnp.diff(W)
    return jnp.where(mass > 0, jnp.diff(S) / jnp.where(mass > 0, mass, 1.0), jnp.nan)

  batch = max(1, _inits.TABLE_ENTRIES // (width + 1) ** 2)
  start = _inits.map_groups(one_group, (small, k_active[small]), batch=batch)
  active = jnp.arange(K)[None, :] < k_active[small][:, None]
  start = jnp.where(active, _inits.fill_empty(start), jnp.inf)
  return c.at[small].set(jax.lax.cummax(start, axis=1))


def exact_start(init: str, objective: str, method: str) -> bool:
  """Whether groups of at most ``exact_up_to`` values start from their exact DP."""
  return init == "dp" and objective == "l2" and method != "exact"


def _small_buckets(sizes: np.ndarray, k: np.ndarray, exact_up_to: int):
  """Groups with more values than clusters and at most ``exact_up_to``, by
  their size rounded up to 16 (the DP's width): ((width, ...), (indices, ...))."""
  small = np.flatnonzero((sizes > k) & (sizes <= exact_up_to))
  width = -(-sizes[small] // 16) * 16
  buckets = tuple(int(v) for v in np.unique(width))
  return buckets, tuple(jnp.asarray(small[width == v], jnp.int32) for v in buckets)


def _exact_small_groups(c, x, frame, arrays, tiny, active):
  """Groups with at most as many values as clusters keep every value as its
  own centroid (sorted; the spare slots repeat the largest)."""
  if tiny.shape[0] == 0:
    return c
  K = c.shape[1]
  size = arrays.group_size[tiny][:, None]
  slot = jnp.arange(K)[None, :]
  values = x[arrays.group_start[tiny][:, None] + jnp.minimum(slot, size - 1)]
  values = jnp.sort(jnp.where(slot < size, values - frame.center[tiny][:, None], jnp.inf), axis=1)
  largest = jnp.take_along_axis(values, size - 1, axis=1)
  values = jnp.where(slot < size, values, largest)
  return c.at[tiny].set(jnp.where(active[tiny], values, jnp.inf))


def _check_options(method, init, objective, max_iter, tol):
  for name, value, allowed in (("method", method, METHODS), ("init", init, INITS),
                               ("objective", objective, OBJECTIVES)):
    if value not in allowed:
      raise ValueError(f"{name}={value!r} is not one of {allowed}.")
  if max_iter < 0 or tol < 0:
    raise ValueError(f"max_iter and tol must be >= 0, got {max_iter} and {tol}.")


def _cluster_counts(num_clusters, num_groups: int) -> np.ndarray:
  """One positive integer K per group from an int or a sequence of ints."""
  k = np.asarray(num_clusters)
  if k.dtype == bool or not np.issubdtype(k.dtype, np.integer) or k.ndim > 1:
    raise ValueError(f"num_clusters must be an int or one int per group, got {num_clusters!r}.")
  if k.ndim == 1 and k.size != num_groups:
    raise ValueError(f"num_clusters has {k.size} entries for {num_groups} groups; give one "
                     "int for all groups or one per group (len(group_sizes)).")
  k = np.broadcast_to(k.astype(np.int64), (num_groups,))
  if k.min() < 1:
    raise ValueError(f"num_clusters must be >= 1, got {int(k.min())}.")
  return k


def _round_bins(bins) -> int:
  """Any bins in MIN_BINS..MAX_BINS, rounded up to a power of two (the coarse
  histograms of the inits merge fine bins in equal power-of-two runs)."""
  if (isinstance(bins, bool) or not isinstance(bins, (int, np.integer))
      or not MIN_BINS <= bins <= hist_lib.MAX_BINS):
    raise ValueError(f"bins must be an integer in {MIN_BINS}..{hist_lib.MAX_BINS}, got {bins!r} "
                     "(any value in range works; it is rounded up to a power of two).")
  return 1 << int(bins - 1).bit_length()


def _warn_zero_importance(h, group_sizes):
  if is_traced(h):
    return
  starts = np.concatenate([[0], np.cumsum(group_sizes)[:-1]])
  zero = np.flatnonzero(np.add.reduceat(np.asarray(h), starts) == 0)
  if zero.size:
    warnings.warn(f"{zero.size} group(s) have all-zero importance (first: group "
                  f"{int(zero[0])}); clustering them with uniform weights.", stacklevel=3)


def grouped_kmeans_1d(values, importance, group_sizes: Sequence[int], num_clusters, *,
                      method: str = "hist", init: str = "dp",
                      objective: str = "l2", max_iter: int = 300, tol: float = 1e-6,
                      key=None, bins: int | None = None, refine_iters: int = 1,
                      exact_max_points: int = 4096,
                      exact_up_to: int = EXACT_UP_TO) -> Clustering:
  """Clusters each contiguous group of ``values`` into its own codebook.

  Args:
    values: (N,) floats; group g is ``values[sum(group_sizes[:g]):][:group_sizes[g]]``.
    importance: (N,) non-negative weights (e.g. mean ``|dL/dw|`` or mean g^2), or
      None for plain k-means. A group whose importance is all zero falls back
      to uniform weights (with a warning when called outside jit).
    group_sizes: static positive sizes summing to N.
    num_clusters: an int for every group, or one int per group.
    method: "hist" (default), "lloyd" or "exact"; see the module docstring.
    init: "dp" (default: the optimal partition of the histogram on a grid
      of up to 1024 positions, coarse to fine; for groups of at most
      ``exact_up_to`` values, of the values themselves;
      greedy "kmeans++" when K > 32), "companding" (quantiles of density^(1/3), the
      asymptotically optimal spacing), "density" (weighted quantiles),
      "linear" (min..max), "forgy" (random members) or "kmeans++"
      (importance-weighted D^2 sampling). Ignored by method="exact".
    objective: "l2" (weighted mean centroids) or "l1" (weighted medians; the
      data-level refinement then costs one sort).
    max_iter, tol: Lloyd stops after max_iter steps or when no centroid moves
      by more than tol x the group's value range.
    key: PRNG key for "forgy" / "kmeans++"; the result is a pure function of it.
    bins: histogram bins per group, any integer in 16..65536, rounded up to a
      power of two (default: from the group size and K, at most 65536; at
      most 4096 for the exact method's DP).
    refine_iters: Lloyd steps on the real values after "hist" / "exact".
    exact_max_points: "exact" runs on the sorted values themselves when every
      group has at most this many, otherwise on a histogram of ``bins`` bins.
    exact_up_to: with init "dp" and objective "l2", a group of at most this
      many values (default 256) starts from its exact optimum (so it ends
      there): the full DP over its sorted values
      on the device, O(K n^2) for n values (about 1 us a value at n = 128, K =
      16 on two CPU cores; larger groups go through the histogram). A
      histogram of a few hundred values is too coarse to be near-optimal; a
      layer's first convolution or a group of 128 is where this matters. 0
      turns it off (faster for very many small groups).

  Returns:
    :class:`Clustering` with centroids (G, K), K = max(num_clusters), and
    assignments (N,). A group never holds more than its own number of distinct
    centroid values; with more clusters than distinct values some clusters
    are simply empty (duplicated centroids), never NaN. A group with at most
    its K distinct values (-0.0 and 0.0 count as one) gets exactly those
    values as its centroids (sorted; the spare slots repeat the largest), so
    ``centroids[assignments]`` gives its values back exactly, whatever the
    method. Each group's result is the one it gets alone (``kmeans_1d`` on
    its values, same options and key).
  """
  _check_options(method, init, objective, max_iter, tol)
  if isinstance(exact_up_to, bool) or not isinstance(exact_up_to, (int, np.integer)) \
      or exact_up_to < 0:
    raise ValueError(f"exact_up_to must be an integer >= 0 (0 turns the exact DP of small "
                     f"groups off), got {exact_up_to!r}.")
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
  k = _cluster_counts(num_clusters, len(group_sizes))
  check_finite("values", values)
  check_finite("importance", importance)
  check_nonnegative("importance", importance)
  _warn_zero_importance(importance, group_sizes)
  if key is None:
    key = jax.random.PRNGKey(0)
  K = int(k.max())
  if bins is not None:
    bins = _round_bins(bins)
  # The exact method's host DP costs O(K bins log bins) per group.
  exact_bins = min(bins or _layout.default_bins(max(group_sizes), K), _EXACT_BINS)
  with jax.ensure_compile_time_eval():  # cached layout arrays: never tracers of this call
    plan, arrays = _layout.make(group_sizes, K, bins)
    seg = hist_lib.group_ids(group_sizes)
  sizes = np.asarray(group_sizes)
  tiny = np.flatnonzero(sizes <= k)
  if not exact_start(init, objective, method):
    exact_up_to = 0
  small_widths, small = _small_buckets(sizes, k, exact_up_to)
  rest = None  # the groups that need a histogram start: all but the small ones
  if small:
    rest = jnp.asarray(np.flatnonzero((sizes <= k) | (sizes > exact_up_to)), jnp.int32)
  out = _grouped_kmeans(values, importance, jnp.asarray(k, jnp.int32), key, arrays,
                        jnp.asarray(tiny, jnp.int32), small, rest, plan=plan, K=K, method=method,
                        init=init, objective=objective, max_iter=int(max_iter),
                        tol=float(tol), exact_bins=int(exact_bins),
                        refine_iters=int(refine_iters),
                        exact_max_points=int(exact_max_points),
                        small_widths=small_widths)
  # Every method's result goes through here: a group with at most its K distinct values
  # gets them exactly (lossless), not centroids computed about the group's centre.
  return Clustering(*_distinct.exact_groups(values, seg, k, out.centroids, out.assignments))


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
  """``sum h (x - c_a)^2`` (l2) or ``sum h |x - c_a|`` (l1) for one group."""
  diff = jnp.abs(jnp.asarray(values) - jnp.asarray(centroids)[assignments])
  h = jnp.ones_like(diff) if importance is None else jnp.asarray(importance)
  return jnp.sum(h * (diff * diff if objective == "l2" else diff))
