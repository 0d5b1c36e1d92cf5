"""Starting codebooks for grouped 1-D k-means: one signature, one table.

Every start is ``fn(s: InitInputs) -> (G, K)`` centroids relative to each
group's centre; slots past a group's own cluster count are ignored (they are
set to +inf afterwards). :data:`INITS` maps the public names to them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gkq_jax import _histogram as hist_lib


class InitInputs(NamedTuple):
  hist: hist_lib.Histogram
  frame: hist_lib.Frame
  xc: jax.Array  # (N,) values relative to their group's centre
  k_active: jax.Array  # (G,) clusters each group asked for
  K: int  # static: the padded number of clusters
  key: jax.Array
  objective: str
  starts: jax.Array  # (G,) first position of each group
  sizes: jax.Array  # (G,) group sizes


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


def linear(s: InitInputs):
  """Evenly spaced from the group's minimum to its maximum."""
  half = s.frame.half_range[:, None]
  denom = jnp.maximum(s.k_active - 1, 1).astype(jnp.float32)
  t = jnp.arange(s.K)[None, :] / denom[:, None]
  return jnp.where((s.k_active == 1)[:, None], 0.0, -half + 2 * half * t)


def density(s: InitInputs):
  """Weighted quantiles at (k + 0.5) / k_g, interpolated inside their bin."""
  return _interpolated_quantiles(s.hist.weight, hist_lib.left_edge(s.hist),
                                 hist_lib.bin_width(s.hist), s.k_active, s.K)


_COMPANDING_BINS = 1024


def companding(s: InitInputs):
  """Quantiles of density^(1/3) (l2) or density^(1/2) (l1).

  For many clusters the optimal quantizer places centroids with a point
  density proportional to p^(1/3) (Panter & Dite; Gersho), so this start is
  already close to optimal where plain weighted quantiles crowd the centroids
  into the bulk and Lloyd needs thousands of steps to spread them out. A
  coarse histogram keeps the power law from amplifying sampling noise.
  """
  B = s.hist.weight.shape[1]
  M = min(B, _COMPANDING_BINS)
  w, _, _ = hist_lib.coarsen(s.hist, M)
  dens = w ** (1 / 3 if s.objective == "l2" else 1 / 2)
  return _interpolated_quantiles(dens, hist_lib.left_edge(s.hist),
                                 hist_lib.bin_width(s.hist) * (B // M), s.k_active, s.K)


def forgy(s: InitInputs):
  """K random members of each group."""
  u = jax.random.uniform(s.key, (s.sizes.shape[0], s.K))
  idx = s.starts[:, None] + jnp.minimum((u * s.sizes[:, None]).astype(jnp.int32),
                                        s.sizes[:, None] - 1)
  return s.xc[idx]


_KMEANSPP_BINS = 1024


def kmeans_plus_plus(s: InitInputs):
  """Greedy importance-weighted k-means++ on a coarse histogram.

  Each step draws 2 + log(K) candidates by D^2 sampling and keeps the one that
  lowers the potential most (as scikit-learn does); the sampling reaches the
  sparse tails that quantile-based starts leave to a single centroid.
  """
  K = s.K
  G, B = s.hist.weight.shape
  coarse = min(B, _KMEANSPP_BINS)
  w, _, pts = hist_lib.coarsen(s.hist, coarse)
  trials = 2 + int(np.log(max(K, 1)))

  def sample(key, p, n):
    # Inverse-CDF draws: n uniforms per group instead of a Gumbel per bin.
    p = jnp.where(jnp.any(p > 0, axis=1, keepdims=True), p, (w > 0).astype(p.dtype))
    cdf = jnp.cumsum(p, axis=1)
    u = jax.random.uniform(key, (G, n)) * cdf[:, -1:]
    idx = jax.vmap(lambda c, v: jnp.searchsorted(c, v, side="right"))(cdf, u)
    return jnp.clip(idx, 0, coarse - 1)

  keys = jax.random.split(s.key, K)
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


DP_BINS = 256


def dp(s: InitInputs):
  """Optimal partition of a coarse (256-bin) histogram, by a dense DP.

  Each coarse bin is a point mass at its weighted mean; the O(K M^2) table is
  small enough to fill with plain array ops. float32 suffices here: at the
  K <= M / 8 where this is used, cluster costs are far above the rounding of
  the prefix sums. Fine Lloyd then moves each centroid to the local optimum,
  which from this start is the global one in all but contrived cases.
  """
  K, k_active = s.K, s.k_active
  G, B = s.hist.weight.shape
  M = min(B, DP_BINS)
  w, _, v = hist_lib.coarsen(s.hist, M)
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
  return jnp.where(jnp.isnan(c), jnp.nanmax(jnp.where(jnp.isnan(c), -jnp.inf, c), 1,
                                            keepdims=True), c)


INITS: dict[str, Callable[[InitInputs], jax.Array]] = {
    "dp": dp, "companding": companding, "density": density, "linear": linear,
    "forgy": forgy, "kmeans++": kmeans_plus_plus,
}


def start(name: str, s: InitInputs, active):
  """The named start, sorted per group, inactive slots at +inf. "dp" falls
  back to k-means++ when K is too large for its coarse table to help."""
  if name == "dp" and s.K * 8 > min(s.hist.weight.shape[1], DP_BINS):
    name = "kmeans++"
  c = INITS[name](s)
  return jnp.sort(jnp.where(active, c, jnp.inf), axis=1)
