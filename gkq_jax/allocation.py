"""A byte budget split across layers where it costs the least importance-weighted distortion.

Every selected layer gets a rate-distortion curve: for each candidate setting
(k-means at K clusters, ECSQ at a price per bit, uniform cells at a width),
the bytes the layer then takes in the file (codebook + coded indices,
exactly as :func:`gkq_jax.save` writes them) and its distortion
``sum_i h_i (w_i - q_i)^2`` (with h the Fisher diagonal this is about twice
the loss increase, so layers are comparable). The curves of all layers come
from one grouped call per setting. :func:`allocate` then picks one setting
per layer minimising the total distortion within the budget: the exact
multiple-choice knapsack by dynamic programming over bytes. A Lagrangian
(equal-slope) choice only reaches the corners of the convex hulls of the
curves and leaves the bytes between two corners unused; the DP does not.

:func:`quantize_to_budget` (also ``gkq_jax.quantize(..., budget_bytes=...)``)
does all of it for a parameter pytree.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gkq_jax import _distinct
from gkq_jax import ecsq as ecsq_lib
from gkq_jax import rules as rules_lib
from gkq_jax import sharding as sharding_lib
from gkq_jax._clustering import warn_unweighted
from gkq_jax._histogram import group_ids
from gkq_jax._paths import named_leaves
from gkq_jax.clustered import ClusteredArray
from gkq_jax.encode import stored_bytes
from gkq_jax.kmeans1d import grouped_kmeans_1d

METHODS = ("kmeans", "ecsq", "uniform")
ALLOCATIONS = ("optimal", "same")
DEFAULT_CLUSTERS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Bound on the dynamic programme's table (layers x budget units); past it the
# byte unit grows, rates are rounded up to it and the budget still holds.
_MAX_DP_UNITS = 1 << 20


# ------------------------------------------------------------------------- rates


# -------------------------------------------------------------------- allocation


def allocate(rates, distortions, budget: float) -> np.ndarray:
  """One setting per layer minimising total distortion with total rate <= budget.

  Args:
    rates: (L, S) bytes of layer l under setting s (np.inf: not available).
    distortions: (L, S) distortion of layer l under setting s.
    budget: total bytes allowed.

  Returns:
    (L,) index of the chosen setting of each layer. Exact (multiple-choice
    knapsack by dynamic programming over bytes) while ``L x budget`` fits in
    ``2**20`` cells; past that the byte unit grows and rates are rounded up
    to it, so the budget still holds and the result is optimal for the
    rounded rates.
  """
  rates = np.asarray(rates, np.float64)
  dist = np.asarray(distortions, np.float64)
  if rates.ndim != 2 or rates.shape != dist.shape:
    raise ValueError(f"rates and distortions must both be (layers, settings), got "
                     f"{rates.shape} and {dist.shape}.")
  smallest = float(np.sum(np.min(rates, axis=1)))
  if not budget >= smallest:
    raise ValueError(f"budget={budget:.0f} bytes is below the smallest possible size, "
                     f"{smallest:.0f} bytes (every layer at its smallest setting); raise it.")
  L, S = rates.shape
  unit = max(1, math.ceil(L * budget / _MAX_DP_UNITS))
  cells = int(budget // unit)
  steps = np.where(np.isfinite(rates), np.ceil(rates / unit), cells + 1).astype(np.int64)
  dist = np.where(np.isfinite(rates), dist, np.inf)
  # best[b]: least distortion of the layers so far within b units.
  best = np.zeros(cells + 1)
  choice = np.zeros((L, cells + 1), np.int32)
  for layer in range(L):
    new = np.full(cells + 1, np.inf)
    for s in range(S):
      r = steps[layer, s]
      if r > cells:
        continue
      cand = np.full(cells + 1, np.inf)
      cand[r:] = best[:cells + 1 - r] + dist[layer, s]
      better = cand < new
      new[better] = cand[better]
      choice[layer, better] = s
    best = new
  if not np.isfinite(best[cells]):
    raise ValueError(f"budget={budget:.0f} bytes cannot be met with rates rounded up to "
                     f"{unit}-byte units; raise it a little.")
  picked = np.zeros(L, np.int64)
  b = cells
  for layer in range(L - 1, -1, -1):
    picked[layer] = choice[layer, b]
    b -= steps[layer, picked[layer]]
  return picked


# ------------------------------------------------------------- whole parameter trees


class _Leaf(NamedTuple):
  path: str
  shape: tuple
  kept: np.ndarray  # flat positions that are clustered
  pinned: bool  # index 0 is an exact zero (pruned weights, or pin_zero)
  pinned_count: int  # pruned weights (outside ``kept``)


class _Setting(NamedTuple):
  """One layer under one candidate: what the file would hold and what it costs."""

  codebook: np.ndarray  # (k,)
  indices: np.ndarray  # the leaf's shape
  bytes: int
  distortion: float


class Choice(NamedTuple):
  """What :func:`quantize_to_budget` chose for one layer."""

  path: str
  method: str  # "kmeans", "ecsq" or "uniform"
  setting: float  # K, lam, or cell width
  num_clusters: int  # codebook entries (a pinned zero included)
  bytes: int  # what the file spends on the layer (gkq_jax.stored_bytes)
  distortion: float  # sum h (w - q)^2


class BudgetResult(NamedTuple):
  quantized: Any  # params with ClusteredArray leaves
  choices: list  # one Choice per clustered leaf, in tree order


class _Problem:
  """The selected leaves of a params tree laid out for grouped clustering."""

  def __init__(self, params, importance, rules, masks, pin_zero, room):
    named = named_leaves(params)
    self.treedef = jax.tree.structure(params)
    self.leaves = [leaf for _, leaf in named]
    rules_lib.check_rules(params, rules)
    floating = lambda leaf: jax.dtypes.issubdtype(jnp.result_type(leaf), jnp.floating)
    self.chosen = [i for i, (path, leaf) in enumerate(named)
                   if floating(leaf) and rules_lib.clusters_for(rules, path, leaf) > 0]
    if not self.chosen:
      raise ValueError("no parameter is selected for clustering: check the rules' patterns "
                       f"against paths such as {[p for p, _ in named[:4]]}.")
    imps, mask_leaves = [None] * len(named), [None] * len(named)
    for name, tree in (("importance", importance), ("masks", masks)):
      if tree is None:
        continue
      try:  # None leaves (uniform importance, no mask) are allowed
        leaves = self.treedef.flatten_up_to(tree)
      except (ValueError, TypeError) as e:
        raise ValueError(f"{name} must have the same tree structure as params: "
                         f"{str(e).splitlines()[0]}") from e
      if name == "importance":
        imps = leaves
      else:
        mask_leaves = leaves
    if importance is not None:
      warn_unweighted("quantize_to_budget", [named[i][0] for i in self.chosen],
                      [imps[i] for i in self.chosen], stacklevel=4)
    self.layout, self.dtypes, xs, hs = [], [], [], []
    for i in self.chosen:
      path, leaf = named[i]
      w = np.asarray(leaf, np.float32).reshape(-1)
      imp = (np.ones_like(w) if imps[i] is None
             else np.asarray(imps[i], np.float32).reshape(-1))
      if imp.shape != w.shape:
        raise ValueError(f"importance of {path} has {imp.size} entries, the parameter {w.size}.")
      keep = (np.ones(w.size, bool) if mask_leaves[i] is None
              else np.asarray(mask_leaves[i], bool).reshape(-1))
      if not keep.any():
        raise ValueError(f"{path}: every weight is pruned; prune less.")
      kept = np.flatnonzero(keep)
      pinned = bool(pin_zero or kept.size < w.size)
      self.layout.append(_Leaf(path, tuple(np.shape(leaf)), kept, pinned, w.size - kept.size))
      self.dtypes.append(np.dtype(jnp.result_type(leaf)))
      xs.append(w[kept])
      hs.append(imp[kept])
    self.x, self.h = np.concatenate(xs), np.concatenate(hs)
    self.sizes = tuple(leaf.kept.size for leaf in self.layout)
    self.pin = np.array([leaf.pinned for leaf in self.layout])
    self.pinned_counts = np.array([leaf.pinned_count for leaf in self.layout], np.float64)
    starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
    x, h = self.x.astype(np.float64), self.h.astype(np.float64)
    mass = np.maximum(np.add.reduceat(h, starts), 1e-30)
    centred = x - np.repeat(np.add.reduceat(h * x, starts) / mass, self.sizes)
    # Weighted spread per value: the natural unit of lam for each layer.
    self.spread = np.maximum(np.add.reduceat(h * centred ** 2, starts) / self.sizes, 1e-30)
    self.reach = np.maximum.reduceat(np.abs(x), starts)
    # Each layer's distinct values: where a candidate has room for all of them, they are
    # its codebook exactly (lossless), whatever the method computed.
    # ``room``: the most entries any candidate's codebook has.
    seg = group_ids(self.sizes)
    count = np.asarray(_distinct.distinct(self.x, seg, num_groups=len(self.sizes), width=1)[0])
    width = int(max(count[count <= room], default=1))
    self.distinct_count, book, rank = (np.asarray(a) for a in _distinct.distinct(
        self.x, seg, num_groups=len(self.sizes), width=width))
    self.distinct_book, self.distinct_rank = book, rank

  def settings(self, centroids, assignments, num_used, shift_pinned):
    """Per leaf: the _Setting of one grouped result (``shift_pinned``: the
    clusterer did not know of the pinned zero, so its indices move up by one)."""
    out, offset = [], 0
    centroids, assignments = np.asarray(centroids), np.asarray(assignments)
    for g, (leaf, n) in enumerate(zip(self.layout, self.sizes)):
      a = assignments[offset:offset + n].astype(np.int64)
      book = centroids[g, :int(num_used[g])].astype(np.float32)
      shift = leaf.pinned and shift_pinned
      # Room for every distinct value (beside a pinned zero the clusterer kept): lossless.
      if self.distinct_count[g] <= num_used[g] - (leaf.pinned and not shift_pinned):
        book = self.distinct_book[g, :self.distinct_count[g]]
        a, shift = self.distinct_rank[offset:offset + n].astype(np.int64), leaf.pinned
      err = self.x[offset:offset + n].astype(np.float64) - book[a]
      distortion = float(np.dot(self.h[offset:offset + n], err * err))
      offset += n
      if shift:
        book, a = np.concatenate([np.zeros(1, np.float32), book]), a + 1
      full = np.zeros(int(np.prod(leaf.shape)), np.int64)
      full[leaf.kept] = a
      dtype = np.uint8 if book.size <= 256 else np.uint16
      indices = full.reshape(leaf.shape).astype(dtype)
      nbytes = stored_bytes(ClusteredArray(book[None, :], indices, pinned_zero=leaf.pinned,
                                           dtype=self.dtypes[g]))
      out.append(_Setting(book, indices, nbytes, distortion))
    return out

  def build(self, picked: Sequence[_Setting]):
    out = list(self.leaves)
    for i, leaf, s, dtype in zip(self.chosen, self.layout, picked, self.dtypes):
      out[i] = ClusteredArray(jnp.asarray(s.codebook[None, :]), jnp.asarray(s.indices),
                              pinned_zero=leaf.pinned, dtype=dtype)
    return jax.tree_util.tree_unflatten(self.treedef, out)


class _Candidates:
  """Runs of one method over all layers; each run is one grouped call."""

  def __init__(self, problem, method, key, ecsq_clusters, options):
    self.problem, self.method, self.key, self.options = problem, method, key, options
    self.seen = []
    p = problem
    if method == "ecsq":
      k = np.full(len(p.sizes), ecsq_clusters)
      self.k = k
      self.start = ecsq_lib._kmeans_start(p.x, p.h, p.sizes, k, p.pin, key, options)
    elif method == "uniform":
      self.scale = ecsq_lib._slope_scale(p.h, p.sizes, True)

  def run(self, setting):
    """_Settings of every layer at ``setting`` (K, or lam / width per layer);
    every run is remembered in ``seen`` as a candidate for the allocation."""
    p = self.problem
    if self.method == "kmeans":
      own = np.asarray(setting, np.int64) - p.pin
      out = grouped_kmeans_1d(p.x, p.h, p.sizes, own, key=self.key, **self.options)
      result = p.settings(out.centroids, out.assignments, own, shift_pinned=True)
    else:
      if self.method == "ecsq":
        out = ecsq_lib.grouped_ecsq_1d(p.x, p.h, p.sizes, self.k, setting, pin_zero=p.pin,
                                       pinned_zeros=p.pinned_counts, init_centroids=self.start)
      else:
        out = ecsq_lib.grouped_uniform_1d(p.x, p.h, p.sizes, setting, pin_zero=p.pin,
                                          pinned_zeros=p.pinned_counts)
      result = p.settings(out.centroids, out.assignments, np.asarray(out.num_used),
                          shift_pinned=False)
    self.seen.append((np.asarray(setting, np.float64), result))
    return result

  def grid(self, clusters, points):
    """Per-layer settings of the runs behind the rate-distortion curves."""
    p = self.problem
    ones = np.ones(len(p.sizes))
    if self.method == "kmeans":
      return [k * ones for k in clusters]
    if self.method == "ecsq":  # prices from ~8 bits down to ~0.1 bit per weight, per layer
      return [r * p.spread for r in np.geomspace(1e-5, 4.0, points)]
    return [r * p.reach for r in np.geomspace(1 / 120, 2.0, points)]

  def same(self, budget, clusters):
    """Settings of one setting for all layers: the best within ``budget``
    (setting per layer, _Settings) or None, and the smallest size seen."""
    p = self.problem
    total = lambda settings: sum(s.bytes for s in settings)
    if self.method == "kmeans":
      runs = [(k * np.ones(len(p.sizes)), self.run(k)) for k in clusters]
      fits = [r for r in runs if total(r[1]) <= budget]
      best = min(fits, key=lambda r: sum(s.distortion for s in r[1]), default=None)
      return best, min(total(r[1]) for r in runs)
    if self.method == "ecsq":  # one lam for every layer: equal slopes
      scale = float(np.mean(p.spread))
      per_layer = lambda lam: lam * np.ones(len(p.sizes))
      lo, hi, floor = 0.0, scale * 64, scale * 1e-9
    else:
      t_max = float(np.max(p.reach / self.scale)) * 4
      per_layer = lambda t: t * self.scale
      lo, hi, floor = t_max / 1e6, t_max, None
    found, out = ecsq_lib._bisect_log(lambda v: self.run(per_layer(v)), total, budget, lo, hi,
                                      lo_floor=floor)
    return (None if found is None else (per_layer(found), out)), total(out)


def quantize_to_budget(params: Any, importance: Any, rules: Sequence[rules_lib.ClusterRule],
                       budget_bytes: float, *, methods: Sequence[str] = ("kmeans", "ecsq"),
                       allocation: str = "optimal",
                       clusters: Sequence[int] = DEFAULT_CLUSTERS, ecsq_clusters: int = 32,
                       points: int = 12, masks: Any = None, pin_zero: bool = False, key=None,
                       **cluster_options) -> BudgetResult:
  """Clusters the selected leaves so that they take at most ``budget_bytes``
  in the file (codebooks + coded indices, the per-leaf bytes
  :func:`gkq_jax.save` reports), with the least importance-weighted distortion.

  Args:
    params, importance, rules, masks, key: as for :func:`gkq_jax.quantize`;
      the rules only select leaves (their numbers of clusters are not used).
    budget_bytes: bytes allowed for the selected leaves.
    methods: candidate families: "kmeans" (``grouped_kmeans_1d`` at each K of
      ``clusters``, with ``cluster_options``), "ecsq" (``grouped_ecsq_1d``
      from ``ecsq_clusters`` clusters at ``points`` prices per bit) and
      "uniform" (``grouped_uniform_1d`` at ``points`` cell widths).
    allocation: "optimal": each layer its own setting, the total distortion
      minimised by :func:`allocate` over all candidates of ``methods``;
      "same": one setting for every layer (the K of ``clusters``, or the lam
      / cell width found by bisection) - the best method of ``methods`` wins.
    pin_zero: give every layer a pinned exact zero (index 0, never moved by
      fine-tuning) so that ECSQ and uniform cells can prune as they
      quantize and the sparse coding applies; pruned layers always have one.

  Returns:
    :class:`BudgetResult` (the quantized params and one :class:`Choice` per layer).
  """
  for name, values, allowed in (("methods", methods, METHODS),
                                ("allocation", [allocation], ALLOCATIONS)):
    bad = [v for v in values if v not in allowed]
    if bad or not values:
      raise ValueError(f"{name}={bad or values} must be taken from {allowed}.")
  if not np.isfinite(budget_bytes) or budget_bytes <= 0:
    raise ValueError(f"budget_bytes must be a positive number of bytes, got {budget_bytes}.")
  if min(clusters) < 2:
    raise ValueError(f"clusters must all be >= 2, got {tuple(clusters)}.")
  for path, leaf in named_leaves(params):
    sharding, rule = sharding_lib.named_sharding(leaf), rules_lib.rule_for(rules, path)
    if sharding is not None and rule is not None and jnp.ndim(leaf) >= rule.min_ndim:
      raise ValueError(
          f"{path} is sharded over {sharding.mesh.size} devices ({sharding.spec}); the byte "
          "budget's allocation compares candidate clusterings over all of a layer's values "
          "in one place and would gather it onto one device. Quantize it where it lies "
          "instead (quantize(..., granularity='layer' or 'channel') with bits per rule), or "
          "pass the model unsharded.")
  problem = _Problem(params, importance, rules, masks, pin_zero,
                     room=max(max(clusters), ecsq_clusters, ecsq_lib.MAX_CELLS + 1))
  key = jax.random.PRNGKey(0) if key is None else key
  families = [_Candidates(problem, m, key, ecsq_clusters, cluster_options) for m in methods]
  L = len(problem.layout)
  if allocation == "optimal":
    for family in families:
      for setting in family.grid(clusters, points):
        family.run(setting)
      if family.method != "kmeans":  # one price / width for all: dense near the budget
        family.same(budget_bytes, clusters)
    runs = [(family.method, setting, run) for family in families
            for setting, run in family.seen]
    rates = np.array([[run[l].bytes for _, _, run in runs] for l in range(L)], np.float64)
    dist = np.array([[run[l].distortion for _, _, run in runs] for l in range(L)])
    picked = allocate(rates, dist, budget_bytes)
    chosen = [(runs[s][0], runs[s][1][l], runs[s][2][l]) for l, s in enumerate(picked)]
  else:
    best, smallest = None, np.inf
    for family in families:
      found, least = family.same(budget_bytes, clusters)
      smallest = min(smallest, least)
      if found is not None:
        total = sum(s.distortion for s in found[1])
        if best is None or total < best[0]:
          best = (total, family.method) + found
    if best is None:
      raise ValueError(f"budget_bytes={budget_bytes:.0f} is below the smallest size one "
                       f"setting for all layers reaches here ({smallest:.0f} bytes); raise it.")
    chosen = [(best[1], best[2][l], s) for l, s in enumerate(best[3])]
  quantized = problem.build([s for _, _, s in chosen])
  choices = [Choice(leaf.path, method, float(setting), int(s.codebook.size), int(s.bytes),
                    float(s.distortion))
             for leaf, (method, setting, s) in zip(problem.layout, chosen)]
  return BudgetResult(quantized, choices)
