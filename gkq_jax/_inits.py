"""Starting codebooks for grouped 1-D k-means: one signature, one table.

Every start is ``fn(s: InitInputs) -> (G, K)`` centroids relative to each
group's centre; slots past a group's own cluster count are ignored (they are
set to +inf afterwards). :data:`INITS` maps the public names to them. Groups
differ in their number of bins but share one compiled program: per-group work
reads the flat histogram at computed positions. Random starts draw the same
numbers for every group, so a group starts the same alone or among others.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gkq_jax import _histogram as hist_lib


class InitInputs(NamedTuple):
  hist: hist_lib.Histogram
  k_active: jax.Array  # (G,) clusters each group asked for
  K: int  # static: the padded number of clusters
  max_bins: int  # static: the most bins of any group
  key: jax.Array
  objective: str
  x: jax.Array  # (N,) all values (for "forgy")
  start: jax.Array  # (G,) first position of each group in x
  size: jax.Array  # (G,) group sizes
  center: jax.Array  # (G,) group centres


# Groups per vectorised step of the per-group starts: bounds their tables.
_GROUP_BATCH = 4096
# Entries of the per-group tables (DP costs, k-means++ candidates) of one
# vectorised step: 1 MiB of float32, a fixed part of a device's working memory.
TABLE_ENTRIES = 1 << 18


def map_groups(fn, args, batch: int = _GROUP_BATCH):
  """vmap(fn) over the leading (group) axis of ``args``, ``batch`` groups at
  a time; groups are padded to whole batches so fn is traced once."""
  G = jax.tree.leaves(args)[0].shape[0]
  if G <= batch:
    return jax.vmap(fn)(*args)
  batch = -(-G // -(-G // batch))  # as many batches as needed, evenly filled
  padded = -(-G // batch) * batch
  pad = lambda a: jnp.concatenate([a, jnp.repeat(a[:1], padded - G, axis=0)])
  out = jax.lax.map(lambda a: fn(*a), tuple(pad(a) for a in args), batch_size=batch)
  return jax.tree.map(lambda a: a[:G], out)


def _interpolated_quantiles(mass, left, width, k_active, K):
  """Points at cumulative fractions (k + 0.5) / k_g of ``mass`` (M,), a
  histogram of M bins of ``width`` from ``left``, interpolated inside bins."""
  M = mass.shape[0]
  cum = jnp.concatenate([jnp.zeros(1), jnp.cumsum(mass)])
  target = (jnp.arange(K) + 0.5) / k_active * cum[-1]
  idx = jnp.clip(jnp.searchsorted(cum[1:], target), 0, M - 1)
  frac = jnp.clip((target - cum[idx]) / jnp.where(mass[idx] > 0, mass[idx], 1.0), 0.0, 1.0)
  return left + (idx + frac) * width


def linear(s: InitInputs):
  """Evenly spaced from the group's minimum to its maximum."""
  half = s.hist.half_range[:, None]
  denom = jnp.maximum(s.k_active - 1, 1).astype(jnp.float32)
  t = jnp.arange(s.K)[None, :] / denom[:, None]
  return jnp.where((s.k_active == 1)[:, None], 0.0, -half + 2 * half * t)


def density(s: InitInputs):
  """Weighted quantiles at (k + 0.5) / k_g, interpolated inside their bin."""
  hist = s.hist
  total = hist_lib.prefix(hist.cum_weight, hist.base, hist.bins)
  target = (jnp.arange(s.K)[None, :] + 0.5) / s.k_active[:, None] * total[:, None]
  b = hist_lib.search(hist.cum_weight, hist.base, hist.bins, target, s.max_bins)
  below = hist_lib.prefix(hist.cum_weight, hist.base[:, None], b)
  here = hist.weight[hist.base[:, None] + b]
  frac = jnp.clip((target - below) / jnp.where(here > 0, here, 1.0), 0.0, 1.0)
  width = hist_lib.bin_width(hist)[:, None]
  return -hist.half_range[:, None] + (b + frac) * width


_COARSE_BINS = 1024


def companding(s: InitInputs):
  """Quantiles of density^(1/3) (l2) or density^(1/2) (l1).

  For many clusters the optimal quantizer places centroids with a point
  density proportional to p^(1/3) (Panter & Dite; Gersho), so this start is
  already close to optimal where plain weighted quantiles crowd the centroids
  into the bulk and Lloyd needs thousands of steps to spread them out. A
  coarse histogram keeps the power law from amplifying sampling noise.
  """
  M = min(s.max_bins, _COARSE_BINS)
  w, _, _ = hist_lib.resample(s.hist, M)
  # A group with fewer than M bins spreads each of its own bins over M / bins
  # coarse ones (resample would leave the others empty), so it starts where it
  # would alone, on min(bins, M) coarse bins.
  hist = s.hist
  own = jnp.arange(M)[None, :] * hist.bins[:, None] // M
  base = hist.base[:, None]
  own_w = hist_lib.prefix(hist.cum_weight, base, own + 1) - hist_lib.prefix(
      hist.cum_weight, base, own)
  w = jnp.where((hist.bins < M)[:, None], jnp.maximum(own_w, 0.0), w)
  dens = w ** (1 / 3 if s.objective == "l2" else 1 / 2)
  width = 2 * s.hist.half_range / M
  return jax.vmap(_interpolated_quantiles, in_axes=(0, 0, 0, 0, None))(
      dens, -s.hist.half_range, width, s.k_active, s.K)


def forgy(s: InitInputs):
  """K random members of each group."""
  u = jax.random.uniform(s.key, (1, s.K))
  pick = jnp.minimum((u * s.size[:, None]).astype(jnp.int32), s.size[:, None] - 1)
  return s.x[s.start[:, None] + pick] - s.center[:, None]


def kmeans_plus_plus(s: InitInputs):
  """Greedy importance-weighted k-means++ on a coarse histogram.

  Each step draws 2 + log(K) candidates by D^2 sampling and keeps the one that
  lowers the potential most (as scikit-learn does); the sampling reaches the
  sparse tails that quantile-based starts leave to a single centroid.
  """
  K = s.K
  M = min(s.max_bins, _COARSE_BINS)
  trials = 2 + int(np.log(max(K, 1)))
  keys = jax.random.split(s.key, K)

  def one_group(w, pts):
    def sample(key, p, n):
      # Inverse-CDF draws; every group draws the same uniforms.
      p = jnp.where(jnp.any(p > 0), p, (w > 0).astype(p.dtype))
      cdf = jnp.cumsum(p)
      u = jax.random.uniform(key, (n,)) * cdf[-1]
      return jnp.clip(jnp.searchsorted(cdf, u, side="right"), 0, M - 1)

    first = pts[sample(keys[0], w, 1)[0]]
    c = jnp.full((K,), jnp.inf).at[0].set(first)
    d2 = (pts - first) ** 2

    def body(k, carry):
      c, d2 = carry
      cand = pts[sample(keys[k], w * d2, trials)]  # (T,)
      new_d2 = jnp.minimum(d2[None, :], (pts[None, :] - cand[:, None]) ** 2)
      best = jnp.argmin((w[None, :] * new_d2).sum(-1))
      return c.at[k].set(cand[best]), new_d2[best]

    return jax.lax.fori_loop(1, K, body, (c, d2))[0]

  w, _, pts = hist_lib.resample(s.hist, M)
  return map_groups(one_group, (w, pts), batch=max(1, TABLE_ENTRIES // (M * trials)))


DP_BINS = 1024
DP_MAX_CLUSTERS = 32
# Positions per cluster of the full DP's grid (a power of two at most
# _MAX_COARSE). Fewer are faster (the DP costs K M^2 a group) but not near
# enough: with 4, groups of 576-1,152 values landed up to 2.8% above their
# optimum at K = 16, with 2 up to 7%
# (benchmarks/cluster_exactness.py --coarse-per-cluster).
COARSE_PER_CLUSTER = 8
# The full DP costs K M^2 a group: at most this many positions.
_MAX_COARSE = 128
# Coarse-to-fine DP: each level doubles the resolution and moves every
# boundary by at most this many of the new bins (see :func:`dp`).
_DP_WINDOW = 4


def dp_resolutions(K: int, max_bins: int) -> tuple[int, int]:
  """(bins of the full DP, number of doubling levels after it)."""
  coarse = min(max(4, 1 << (COARSE_PER_CLUSTER * K - 1).bit_length()), _MAX_COARSE,
               max(max_bins, 4))
  final = max(coarse, min(DP_BINS, max_bins))
  return coarse, int(np.log2(final // coarse))


def _first_argmin(a, axis: int, low=None):
  """argmin as a min and a masked min: XLA's CPU argmin is a slow
  variadic reduction, and these tables are reduced millions of times."""
  low = a.min(axis=axis, keepdims=True) if low is None else jnp.expand_dims(low, axis)
  iota = jax.lax.broadcasted_iota(jnp.int32, a.shape, axis % a.ndim)
  return jnp.where(a == low, iota, a.shape[axis] - 1).min(axis=axis)


def _range_cost(a, b):
  """Weighted SSE of the bins between two prefix positions a <= b, given the
  running (mass, moment, moment^2 / mass) at both; the spread inside the fine
  bins is a constant of every partition and left out."""
  w, s, q = (vb - va for va, vb in zip(a, b))
  return jnp.maximum(q - s * s / jnp.where(w > 0, w, 1.0), 0.0)


def coarse_bounds(sums, k_active, K):
  """Optimal cluster boundaries 0 = t_0 <= ... <= t_K = M at M + 1 positions
  by the full O(K M^2) DP; clusters from k_active on are empty (t_k = M)."""
  M = sums[0].shape[0] - 1
  pos = jnp.arange(M + 1)
  cost = _range_cost(tuple(a[:, None] for a in sums), tuple(a[None, :] for a in sums))
  cost = jnp.where(pos[:, None] <= pos[None, :], cost, jnp.inf)  # [i, j]: bins i..j-1
  return optimal_bounds(cost, k_active, K)


def optimal_bounds(cost, k_active, K: int):
  """Optimal boundaries 0 = t_0 <= ... <= t_K = M given the (M + 1, M + 1)
  cost of every range of positions [i, j) (inf for i > j): the O(K M^2) DP."""
  M = cost.shape[0] - 1

  def layer(best, _):
    best = (best[:, None] + cost).min(axis=0)
    return best, best

  _, rest = jax.lax.scan(layer, cost[0], None, length=K - 1)
  best = jnp.concatenate([cost[0][None], rest])  # best[k, j]: k+1 clusters over bins < j

  def back(t_next, k):
    # The split is recomputed here instead of stored: the forward pass stays a plain min.
    t = _first_argmin(best[jnp.maximum(k - 1, 0)] + cost[:, t_next], axis=0)
    t = jnp.where(k >= k_active, M, jnp.where(k == 0, 0, t))
    return t, t

  _, t = jax.lax.scan(back, jnp.int32(M), jnp.arange(K - 1, -1, -1))
  return jnp.concatenate([t[::-1], jnp.full((1,), M, jnp.int32)])


def _refined_bounds(t, sums_at, M, k_active, w):
  """The best boundaries 0..M with each t_k within w positions of ``t``: a
  DP over 2w + 1 candidates per boundary, O(K w^2)."""
  K = t.shape[0] - 1
  k = jnp.arange(K + 1)[:, None]
  cand = jnp.clip(t[:, None] + jnp.arange(-w, w + 1)[None, :], 0, M)
  cand = jnp.where(k == 0, 0, jnp.where(k >= k_active, M, cand))  # (K + 1, 2w + 1)
  at = sums_at(cand)

  def layer(best, layer_k):
    prev, here, cand_prev, cand_here = layer_k
    total = best[:, None] + _range_cost(tuple(a[:, None] for a in prev),
                                        tuple(a[None, :] for a in here))
    total = jnp.where(cand_prev[:, None] <= cand_here[None, :], total, jnp.inf)
    low = total.min(axis=0)
    return low, _first_argmin(total, axis=0, low=low)

  first = jnp.full((2 * w + 1,), jnp.inf).at[0].set(0.0)
  layers = (tuple(a[:-1] for a in at), tuple(a[1:] for a in at), cand[:-1], cand[1:])
  _, choice = jax.lax.scan(layer, first, layers)  # choice[k-1, q]: best candidate of t_{k-1}

  def back(q, choice_k):
    p = choice_k[q]
    return p, p

  _, picks = jax.lax.scan(back, jnp.int32(0), choice[::-1])
  picks = jnp.concatenate([picks[::-1], jnp.zeros(1, jnp.int32)])
  return jnp.take_along_axis(cand, picks[:, None], axis=1)[:, 0]


def _companded_grid(hist, own_final, final: int, objective: str):
  """(G, final + 1) fine-bin positions 0..B: group g's first own_final[g] + 1
  are its grid (the rest repeat B), half at equal steps of its companded mass
  (bin weight^(1/3), ^(1/2) for l1), half evenly spaced.

  An optimal quantizer's centroids have the companded density, so a
  heavy-tailed group gets grid points where its clusters will be, not only
  spread evenly over a range that a few outliers stretch; the even half keeps
  such an outlier, which carries little companded mass, within reach of a
  cluster of its own. Each group's grid depends on its own histogram and
  resolution only."""
  dens = jnp.maximum(hist.weight, 0.0) ** (1 / 3 if objective == "l2" else 1 / 2)
  cum = hist_lib.segmented_cumsum(dens, hist.first_tile)
  total = hist_lib.prefix(cum, hist.base, hist.bins)
  half = (own_final // 2)[:, None]
  q = jnp.arange(1, final // 2 + 1)[None, :]
  bins = hist.bins[:, None]
  # The first bin whose running sum reaches the target q / (half + 1) x total
  # is the number of bins below it where the running sum is non-decreasing: a
  # count of bins by the targets they reach, one pass over the bins. (Each
  # tile's sums are separate dot products, so an empty bin can sit an ulp
  # below the one before it; a target falling exactly there may then move its
  # boundary by a bin against a binary search. Not seen on any data here.)
  below = _bins_below_targets(cum, total, half[:, 0], hist, final // 2)
  companded = jnp.minimum(below, bins - 1) + 1
  companded = jnp.where(q <= half, jnp.minimum(companded, bins), bins)
  return _merge_even(companded, half, bins)


def _merge_even(companded, half, bins):
  """0, ``companded`` (G, H) and the even positions q * bins // half (bins
  past half) merged in order: (G, 2H + 1). Both runs are sorted and the even
  one is arithmetic, so every companded position's place is known without a
  sort (XLA's CPU sort of these rows cost a tenth of the whole start)."""
  G, H = companded.shape
  half = jnp.maximum(half, 1)
  even = lambda j: jnp.where(j <= half, j * bins // half, bins)
  # Even positions below c: j * bins // half < c  <=>  j * bins < c * half.
  even_below = jnp.clip((companded * half + bins - 1) // bins - 1, 0, half)
  place = jnp.arange(1, H + 1)[None, :] + even_below  # after the leading 0
  is_companded = jnp.zeros((G, 2 * H + 1), bool).at[jnp.arange(G)[:, None], place].set(True)
  before = jnp.cumsum(is_companded, axis=1, dtype=jnp.int32) - is_companded
  p = jnp.arange(2 * H + 1)[None, :]
  from_companded = jnp.take_along_axis(companded, jnp.clip(before, 0, H - 1), axis=1)
  merged = jnp.where(is_companded, from_companded, even(p - before))
  return jnp.where(p == 0, 0, merged)


def targets_reached(guess, c, t, hh):
  """How many of the targets q / (hh + 1) * t, q = 1..hh, are at most ``c``,
  from a guess at most one off (c / t x (hh + 1) rounded down, which rounding
  can put on the wrong side of a target): checked against the targets as the
  binary search computed them."""
  target = lambda q: q / (hh + 1) * t
  n = jnp.where((guess < hh) & (target(guess + 1) <= c), guess + 1, guess)
  return jnp.where((n > 0) & (target(n) > c), n - 1, n)


def _bins_below_targets(cum, total, half, hist, H: int):
  """(G, H): for q = 1..H, how many of group g's bins but its last have a
  running sum ``cum`` below ``q / (half_g + 1) * total_g`` (the targets past
  half_g are not needed). Each bin finds the last target it reaches, the
  counts of bins per target are summed up; ``hist`` may hold some groups only
  (``Histogram.take``), its flat arrays those of all."""
  G, tile = hist.base.shape[0], hist_lib.MIN_BINS
  tiles = hist.first_tile.shape[0]
  # Row of every tile's group among hist's groups (-1: a group not taken).
  tile_group = jnp.cumsum(hist.first_tile.astype(jnp.int32)) - 1
  row_of = jnp.full((tiles,), -1, jnp.int32).at[tile_group[hist.base // tile]].set(
      jnp.arange(G, dtype=jnp.int32))
  row = row_of[tile_group]
  per_tile = lambda a: jnp.where(row >= 0, a[jnp.maximum(row, 0)], 0)[:, None]
  base, bins, t, hh = (per_tile(a) for a in (hist.base, hist.bins, total, half))
  flat = jnp.arange(tiles * tile, dtype=jnp.int32).reshape(tiles, tile)
  c = cum.reshape(tiles, tile)
  n = jnp.where(t > 0, jnp.floor(c / jnp.where(t > 0, t, 1.0) * (hh + 1)), hh)
  n = targets_reached(jnp.clip(n, 0, hh).astype(jnp.int32), c, t, hh)
  valid = (row[:, None] >= 0) & (flat - base < bins - 1)
  slot = jnp.where(valid, jnp.maximum(row, 0)[:, None] * (H + 1) + n, G * (H + 1))
  counts = jax.ops.segment_sum(valid.astype(jnp.int32).reshape(-1), slot.reshape(-1),
                               G * (H + 1) + 1)
  return jnp.cumsum(counts[:-1].reshape(G, H + 1), axis=1)[:, :H]


def partition(hist, grid, k_active, K: int, coarse: int, levels: int, own_final):
  """Optimal partition of each group's histogram bins, coarse to fine.

  ``grid`` (G, final + 1), final = coarse * 2^levels, holds the positions the
  boundaries may take: group g uses its first ``own_final[g]`` + 1 (a power
  of two from ``coarse`` to final), so its result does not depend on the other
  groups in the call. A full O(K M^2) DP places the K - 1
  boundaries on M = ``coarse`` positions; each following level doubles the
  positions and finds the best boundaries within 4 positions of the previous
  ones, an O(K) DP. Range costs are exact for the bins (each a point mass at
  its weighted mean). Returns (G, K) weighted means, NaN for empty clusters.
  """
  def one_group(base, bins, k_active, grid, own_final):
    own_levels = jnp.round(jnp.log2(own_final / coarse)).astype(jnp.int32)

    def sums_at(pos, M):
      fine = grid[pos * (own_final // M)]
      return tuple(hist_lib.prefix(cum, base, fine)
                   for cum in (hist.cum_weight, hist.cum_moment, hist.cum_square))

    t = coarse_bounds(sums_at(jnp.arange(coarse + 1), coarse), k_active, K)

    def level(i, t):
      M = coarse * 2 ** (i + 1)
      refined = _refined_bounds(2 * t, lambda pos: sums_at(pos, M), M, k_active, _DP_WINDOW)
      return jnp.where(i < own_levels, refined, t)

    t = jax.lax.fori_loop(0, levels, level, t)
    W, S, _ = sums_at(t, own_final)
    w = jnp.diff(W)
    return jnp.where(w > 0, jnp.diff(S) / jnp.where(w > 0, w, 1.0), jnp.nan)

  # Groups per vectorised step: the full DP's (coarse + 1)^2 tables bound it.
  batch = max(1, min(_GROUP_BATCH, TABLE_ENTRIES // (coarse + 1) ** 2))
  return map_groups(one_group, (hist.base, hist.bins, k_active, grid, own_final), batch=batch)


def fill_empty(c):
  """Empty clusters (NaN: fewer non-empty bins than clusters) repeat the real
  centroid below them (above, for leading ones): the start stays sorted."""
  empty = jnp.isnan(c)
  below = jax.lax.cummax(jnp.where(empty, -jnp.inf, c), axis=1)
  above = jax.lax.cummin(jnp.where(empty, jnp.inf, c), axis=1, reverse=True)
  return jnp.where(empty, jnp.where(below > -jnp.inf, below, above), c)


def dp(s: InitInputs):
  """Optimal partition of the histogram on a companded grid of up to 1024
  positions (:func:`partition`, :func:`_companded_grid`). On network
  weights, heavy-tailed ones included, this lands within ~1% of the optimal
  partition of the values; Lloyd on the fine histogram and on the values
  then polishes it."""
  coarse, levels = dp_resolutions(s.K, s.max_bins)
  final = coarse * 2 ** levels
  # The group's own resolution: its bins (a power of two below the 16,384 cap),
  # not the largest group's.
  own_final = jnp.maximum(coarse, jnp.minimum(final, s.hist.bins))
  grid = _companded_grid(s.hist, own_final, final, s.objective)
  return fill_empty(partition(s.hist, grid, s.k_active, s.K, coarse, levels, own_final))


INITS: dict[str, Callable[[InitInputs], jax.Array]] = {
    "dp": dp, "companding": companding, "density": density, "linear": linear,
    "forgy": forgy, "kmeans++": kmeans_plus_plus,
}

_UNORDERED = ("forgy", "kmeans++")


def start(name: str, s: InitInputs, active):
  """The named start, sorted per group, inactive slots at +inf. "dp" falls
  back to k-means++ beyond DP_MAX_CLUSTERS clusters, where its table costs
  more than the whole clustering."""
  if name == "dp" and s.K > DP_MAX_CLUSTERS:
    name = "kmeans++"
  c = jnp.where(active, INITS[name](s), jnp.inf)
  if name in _UNORDERED:
    return jnp.sort(c, axis=1)
  return jax.lax.cummax(c, axis=1)  # ordered already, up to rounding
