"""Grouped 1-D k-means of groups whose values are split over devices.

A layer sharded over a mesh is one codebook group whose values lie on several
devices. Called inside ``shard_map``, each device holds its part of every
group; the groups' ranges, histograms and Lloyd sums are summed across the
devices of ``axis_name`` (tables of bins or clusters, never values), the
histogram start runs on the summed histogram alike on every device, and each
device assigns its own values. The codebooks are those of one device up to
the order of float32 sums (a histogram bin's mass adds the devices' parts);
the indices stay where their values are.

Only what the summed histogram and sums determine can run this way: starts
drawn from the values ("forgy", "kmeans++"), the host's exact DP and weighted
medians (``objective="l1"``) need every value in one place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gkq_jax import _distinct, _inits, _layout, kmeans1d
from gkq_jax._clustering import Clustering
from gkq_jax._histogram import group_ids

SPLIT_INITS = ("dp", "companding", "density", "linear")
_OPTIONS = ("method", "init", "objective", "max_iter", "tol", "bins", "refine_iters",
            "exact_up_to", "exact_max_points")


def check_options(path: str, num_clusters: int, options: dict) -> None:
  """The clear error for options a group split over devices cannot take."""
  unknown = sorted(set(options) - set(_OPTIONS))
  if unknown:
    raise TypeError(f"quantize: unknown clustering option(s) {unknown} for {path}; "
                    f"per-layer clustering takes {_OPTIONS}.")
  method = options.get("method", "hist")
  init = options.get("init", "dp")
  objective = options.get("objective", "l2")
  kmeans1d._check_options(method, init, objective, options.get("max_iter", 300),
                          options.get("tol", 1e-6))
  sharded = f"{path} is sharded over devices and clustered per layer where it lies"
  if method == "exact":
    raise ValueError(f"{sharded}; method='exact' runs on the host over all its values. Use "
                     "method='hist' (the DP start on the histogram summed over devices), or "
                     "pass the leaf unsharded.")
  if objective != "l2":
    raise ValueError(f"{sharded}; objective={objective!r} needs weighted medians of all its "
                     "values in one place. Use objective='l2', or pass the leaf unsharded.")
  if init not in SPLIT_INITS or (init == "dp" and num_clusters > _inits.DP_MAX_CLUSTERS):
    why = (f"init='dp' falls back to k-means++ beyond {_inits.DP_MAX_CLUSTERS} clusters"
           if init == "dp" else f"init={init!r}")
    starts = SPLIT_INITS[1:] if init == "dp" else SPLIT_INITS
    raise ValueError(f"{sharded}; {why} draws its start from the values, which lie on "
                     f"different devices. Use init= one of {starts} (histogram starts), or "
                     "pass the leaf unsharded.")


def takes_exact_dp(group_size: int, options) -> bool:
  """Whether one device would start a group of this size from its exact DP
  over the sorted values (:func:`gkq_jax.grouped_kmeans_1d`'s ``exact_up_to``)."""
  options = dict(options)
  return (kmeans1d.exact_start(options.get("init", "dp"), options.get("objective", "l2"),
                               options.get("method", "hist"))
          and group_size <= options.get("exact_up_to", kmeans1d.EXACT_UP_TO))


def split_grouped_kmeans_1d(values, importance, local_sizes, global_sizes, num_clusters, *,
                            axis_name, key, method="hist", init="dp", objective="l2",
                            max_iter=300, tol=1e-6, bins=None, refine_iters=1, exact_up_to=None,
                            exact_max_points=None) -> Clustering:
  """:func:`gkq_jax.grouped_kmeans_1d` inside ``shard_map`` for groups split
  over the devices of ``axis_name``: ``values`` (N,) are this device's parts
  of the groups, ``local_sizes`` their sizes here, ``global_sizes`` the whole
  groups'. Returns the (replicated) codebooks and this device's assignments.
  ``exact_up_to`` / ``exact_max_points`` are accepted and unused (no exact DP
  over values split across devices)."""
  del exact_up_to, exact_max_points
  k = kmeans1d._cluster_counts(num_clusters, len(local_sizes))
  K = int(k.max())
  bins = kmeans1d._round_bins(bins) if bins else _layout.default_bins(max(global_sizes), K)
  with jax.ensure_compile_time_eval():
    plan, arrays = _layout.make(tuple(local_sizes), K, bins)
    seg = group_ids(tuple(local_sizes))
  x = jnp.asarray(values, jnp.float32)
  h = jnp.ones_like(x) if importance is None else jnp.asarray(importance, jnp.float32)
  none = jnp.zeros((0,), jnp.int32)
  out = kmeans1d._grouped_kmeans(
      x, h, jnp.asarray(k, jnp.int32), key, arrays, none, (), plan=plan, K=K, method=method,
      init=init, objective=objective, max_iter=int(max_iter), tol=float(tol), exact_bins=bins,
      refine_iters=int(refine_iters), exact_max_points=0, small_widths=(), axis_name=axis_name)
  return Clustering(*exact_split_groups(x, seg, k, out.centroids, out.assignments, axis_name))


def exact_split_groups(x, seg, capacity, centroids, assignments, axis_name):
  """:func:`gkq_jax._distinct.exact_groups` for groups split over devices: a
  group with at most ``capacity`` distinct values over all its parts gets them
  as its codebook. Each device sends at most K of its distinct values per
  group (a part with more makes the group inexact anyway)."""
  G, K = centroids.shape
  capacity = jnp.asarray(capacity, jnp.int32)
  count, book, rank = _distinct.distinct(x, seg, num_groups=G, width=K)
  slot = jnp.arange(K)[None, :]
  mine = jnp.where(slot < count[:, None], book, jnp.inf)
  every = jnp.sort(jax.lax.all_gather(mine, axis_name, axis=1, tiled=True), axis=1)
  new = jnp.isfinite(every) & jnp.concatenate(
      [jnp.ones((G, 1), bool), every[:, 1:] != every[:, :-1]], axis=1)
  total = new.sum(axis=1)
  exact = (jax.lax.pmax(count, axis_name) <= capacity) & (total <= capacity)
  column = jnp.where(new, jnp.cumsum(new, axis=1) - 1, K)
  union = jnp.zeros((G, K), jnp.float32).at[jnp.arange(G)[:, None], column].set(every,
                                                                                 mode="drop")
  union = jnp.where(slot < total[:, None], union,
                    jnp.take_along_axis(union, jnp.clip(total - 1, 0, K - 1)[:, None], axis=1))
  position = jax.vmap(jnp.searchsorted)(union, book)  # each local distinct value's entry
  own = position[seg, jnp.minimum(rank, K - 1)]
  return (jnp.where(exact[:, None], union, centroids),
          jnp.where(exact[seg], own, assignments).astype(assignments.dtype))
