"""Grouped importance-weighted 1-D k-means (gkq_jax.kmeans1d)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gkq_jax as gkq
from tests.references import numpy_weighted_lloyd, sse


def test_lloyd_matches_numpy_reference():
  rng = np.random.default_rng(1)
  x = rng.standard_normal(200).astype(np.float32)
  h = rng.random(200).astype(np.float32)
  ours = gkq.kmeans_1d(x, h, 5, method="lloyd", init="linear", max_iter=7, tol=0.0)
  ref = numpy_weighted_lloyd(x.astype(np.float64), h.astype(np.float64),
                             np.linspace(x.min(), x.max(), 5), 7)
  np.testing.assert_allclose(np.asarray(ours.centroids), ref, rtol=1e-4, atol=1e-5)
  nearest = np.argmin(np.abs(x[:, None] - np.asarray(ours.centroids)[None]), axis=1)
  np.testing.assert_array_equal(np.asarray(ours.assignments), nearest)








def test_default_method_is_near_optimal_where_linear_lloyd_is_not(bell):
  x, h = bell
  best = gkq.kmeans_1d(x, h, 16, method="exact")
  best_sse = sse(x, h, best.centroids, best.assignments)
  default = gkq.kmeans_1d(x, h, 16)
  assert sse(x, h, default.centroids, default.assignments) <= 1.005 * best_sse
  errors = {}
  for init in gkq.KMEANS_INITS:
    out = gkq.kmeans_1d(x, h, 16, init=init, key=jax.random.PRNGKey(3))
    errors[init] = sse(x, h, out.centroids, out.assignments) / best_sse
  assert max(errors.values()) <= 1.25, errors
  # Plain Lloyd from Deep Compression's linear start stalls far from the optimum.
  assert errors["linear"] > 1.1 * errors["dp"], errors


def test_lloyd_never_increases_weighted_sse(bell):
  x, h = bell
  errors = []
  for iters in range(0, 8):
    out = gkq.kmeans_1d(x, h, 8, method="lloyd", init="linear", max_iter=iters, tol=0.0)
    errors.append(sse(x, h, out.centroids, out.assignments))
  assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < errors[0]


def test_l1_centroids_are_weighted_medians(bell):
  x, h = bell
  out = gkq.kmeans_1d(x[:500], h[:500], 4, objective="l1", method="lloyd")
  c, a = np.asarray(out.centroids), np.asarray(out.assignments)
  for k in range(4):
    m = a == k
    members, w = x[:500][m], h[:500][m]
    cost = lambda v: (w * np.abs(members - v)).sum()
    # The weighted median minimises the L1 cost over every candidate value.
    assert cost(c[k]) <= min(cost(v) for v in members) * (1 + 1e-5) + 1e-6


def test_assignment_is_nearest_centroid(bell):
  x, h = bell
  for method in gkq.KMEANS_METHODS:
    out = gkq.kmeans_1d(x, h, 16, method=method, bins=64)
    c = np.asarray(out.centroids)
    dist = np.abs(x[:, None] - c[None])
    chosen = dist[np.arange(x.size), np.asarray(out.assignments)]
    np.testing.assert_allclose(chosen, dist.min(1), atol=1e-6)


def test_groups_are_independent_with_own_cluster_counts():
  rng = np.random.default_rng(4)
  a = rng.standard_normal(300).astype(np.float32)
  b = (5 + 3 * rng.standard_normal(500)).astype(np.float32)
  out = gkq.grouped_kmeans_1d(np.concatenate([a, b]), None, (300, 500), (4, 7), bins=1024)
  alone = gkq.kmeans_1d(b, None, 7, bins=1024)
  np.testing.assert_allclose(np.asarray(out.centroids[1]), np.asarray(alone.centroids),
                             rtol=1e-5, atol=1e-5)
  c = np.asarray(out.centroids)
  values = c[np.repeat([0, 1], [300, 500]), np.asarray(out.assignments)]
  assert len(np.unique(values[:300])) <= 4
  assert len(np.unique(values[300:])) <= 7
  assert len(np.unique(c[0])) <= 4  # padding slots repeat a real centroid


def test_more_clusters_than_distinct_values():
  x = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 3.0] * 10, np.float32)
  for method in gkq.KMEANS_METHODS:
    out = gkq.kmeans_1d(x, None, 8, method=method)
    c = np.asarray(out.centroids)
    assert np.isfinite(c).all()
    np.testing.assert_allclose(c[np.asarray(out.assignments)], x, atol=1e-6)


def test_constant_group_and_single_cluster():
  out = gkq.grouped_kmeans_1d(np.array([2.0] * 5 + [1.0, 2.0, 4.0], np.float32), None,
                              (5, 3), (3, 1))
  c = np.asarray(out.centroids)
  assert np.isfinite(c).all()
  np.testing.assert_allclose(c[0], 2.0)
  np.testing.assert_allclose(c[1], 7 / 3, rtol=1e-6)


def test_all_zero_importance_falls_back_to_uniform(bell):
  x, _ = bell
  with pytest.warns(UserWarning, match="all-zero importance"):
    zero = gkq.kmeans_1d(x, np.zeros_like(x), 4)
  uniform = gkq.kmeans_1d(x, None, 4)
  np.testing.assert_allclose(np.asarray(zero.centroids), np.asarray(uniform.centroids), rtol=1e-6)


@pytest.mark.parametrize("bad", ["nan_values", "inf_importance", "negative", "shape",
                                 "k0", "method", "int_values"])
def test_bad_input_raises_clear_error(bad):
  x = np.linspace(-1, 1, 50).astype(np.float32)
  h = np.ones_like(x)
  kwargs = {}
  if bad == "nan_values":
    x[7] = np.nan
    match = "values has 1 non-finite"
  elif bad == "inf_importance":
    h[3] = np.inf
    match = "importance has 1 non-finite"
  elif bad == "negative":
    h[3] = -1
    match = "non-negative"
  elif bad == "shape":
    h = h[:10]
    match = "must match"
  elif bad == "k0":
    kwargs["num_clusters"] = 0
    match = "num_clusters must be >= 1"
  elif bad == "method":
    kwargs["method"] = "kmedoids"
    match = "method='kmedoids' is not one of"
  else:
    x = np.arange(50)
    match = "floating point"
  with pytest.raises(ValueError, match=match):
    gkq.kmeans_1d(x, h, **kwargs)


def test_runs_under_jit_and_is_deterministic(bell):
  x, h = bell

  @jax.jit
  def codebook(x, h):
    return gkq.kmeans_1d(x, h, 8, init="kmeans++", key=jax.random.PRNGKey(5)).centroids

  first = codebook(jnp.asarray(x), jnp.asarray(h))
  np.testing.assert_array_equal(np.asarray(first), np.asarray(codebook(x, h)))
  for method in ("exact",):
    jitted = jax.jit(lambda x, h: gkq.kmeans_1d(x, h, 8, method=method).centroids)
    np.testing.assert_allclose(np.asarray(jitted(x, h)),
                               np.asarray(gkq.kmeans_1d(x, h, 8, method=method).centroids))
  other = gkq.kmeans_1d(x, h, 8, init="forgy", key=jax.random.PRNGKey(1))
  again = gkq.kmeans_1d(x, h, 8, init="forgy", key=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(np.asarray(other.centroids), np.asarray(again.centroids))


def test_any_bins_at_or_above_the_minimum_work(bell):
  x, h = bell
  out = gkq.kmeans_1d(x, h, 8, bins=300)  # rounded up to a power of two
  ref = gkq.kmeans_1d(x, h, 8, bins=512)
  np.testing.assert_array_equal(np.asarray(out.centroids), np.asarray(ref.centroids))
  with pytest.raises(ValueError, match=r"bins must be an integer in 16\.\.65536, got 1"):
    gkq.kmeans_1d(x, h, 8, bins=1)


def test_one_cluster_count_per_group():
  with pytest.raises(ValueError, match=r"num_clusters has 3 entries for 2 groups"):
    gkq.grouped_kmeans_1d(np.zeros(10, np.float32), None, (4, 6), (2, 3, 4))


def test_checkify_reports_nan_under_jit():
  from jax.experimental import checkify
  x = np.linspace(-1, 1, 64).astype(np.float32)
  x[5] = np.nan
  find = checkify.checkify(jax.jit(lambda x: gkq.kmeans_1d(x, None, 4).centroids))
  err, _ = find(x)
  with pytest.raises(checkify.JaxRuntimeError, match=r"values has 1 non-finite.*index \(5,\)"):
    err.throw()
  err, _ = find(np.nan_to_num(x))
  assert err.get() is None
  # Without checkify the jitted call runs as before.
  assert jax.jit(lambda x: gkq.kmeans_1d(x, None, 4).centroids)(x).shape == (4,)


@pytest.mark.parametrize("init", ["forgy", "kmeans++"])
def test_random_starts_are_a_pure_function_of_the_key(bell, init):
  x, h = bell

  def start(seed):  # max_iter=0: the starting codebook itself (K as below: one compile)
    return np.asarray(gkq.kmeans_1d(x, h, 33, method="lloyd", init=init, max_iter=0,
                                    key=jax.random.PRNGKey(seed)).centroids)

  np.testing.assert_array_equal(start(1), start(1))
  assert not np.array_equal(start(1), start(2))


def test_dp_start_falls_back_to_kmeanspp_above_32_clusters(bell):
  x, h = bell
  key = jax.random.PRNGKey(3)

  def start(k, init):
    return np.asarray(gkq.kmeans_1d(x, h, k, method="lloyd", init=init, max_iter=0,
                                    key=key).centroids)

  # 33 clusters: too many for the 256-bin table, so "dp" is k-means++ from the same key.
  np.testing.assert_array_equal(start(33, "dp"), start(33, "kmeans++"))


def test_all_zero_importance_of_one_group_in_a_grouped_call(bell):
  x, h = bell
  values = np.concatenate([x[:1000], 2 * x[1000:2000] + 1])
  ones, zeros = np.ones(1000, np.float32), np.zeros(1000, np.float32)

  def cluster(first, second):  # one compiled program for every call
    return np.asarray(gkq.grouped_kmeans_1d(values, np.concatenate([first, second]),
                                            (1000, 1000), 4).centroids)

  warning = r"1 group\(s\) have all-zero importance \(first: group 1\)"
  with pytest.warns(UserWarning, match=warning):
    zero = cluster(h[:1000], zeros)
  # The zero group is clustered with uniform weights; the other keeps its own.
  np.testing.assert_allclose(zero, cluster(h[:1000], ones), rtol=1e-6)
  assert not np.allclose(zero[0], cluster(ones, ones)[0])  # its importance matters here


def test_hist_l1_update_moves_centroids_to_weighted_medians():
  # Skewed data, where a cluster's weighted mean and weighted median differ by
  # far more than a histogram bin. refine_iters=0: the histogram steps alone.
  rng = np.random.default_rng(5)
  x = rng.lognormal(0.0, 1.0, 4000).astype(np.float32)
  h = rng.random(4000).astype(np.float32)
  out = gkq.kmeans_1d(x, h, 4, objective="l1", refine_iters=0, bins=4096)
  c, a = np.asarray(out.centroids), np.asarray(out.assignments)
  width = (x.max() - x.min()) / 4096
  for k in range(4):
    members, w = x[a == k], h[a == k]
    order = np.argsort(members)
    cum = np.cumsum(w[order])
    median = members[order][np.searchsorted(cum, cum[-1] / 2)]
    # Means sit 10 to 200 bin widths from the medians here.
    assert abs(c[k] - median) <= 6 * width, (k, c[k], median)


def test_default_method_matches_flash1dkmeans(bell):
  flash = pytest.importorskip("flash1dkmeans")
  x, h = bell
  c, a = flash.kmeans_1d(x.astype(np.float64), 16, sample_weights=h.astype(np.float64),
                         random_state=0)
  ours = gkq.kmeans_1d(x, h, 16)
  assert sse(x, h, ours.centroids, ours.assignments) <= 1.005 * sse(x, h, c, a)


@pytest.fixture(scope="module")
def mixed_groups():
  """Groups of very different sizes: fewer values than clusters (3), all-zero
  importance and no multiple of a row (50 values), large (2100)."""
  rng = np.random.default_rng(0)
  sizes = (3, 50, 2100)
  x = np.concatenate([(i + 1) * rng.standard_normal(n) + i for i, n in enumerate(sizes)])
  h = rng.random(x.size) ** 2
  h[3:53] = 0.0
  return x.astype(np.float32), h.astype(np.float32), sizes


@pytest.mark.filterwarnings("ignore:.*all-zero importance")
@pytest.mark.parametrize("method,init", [("hist", "dp"), ("hist", "companding"),
                                         ("lloyd", "kmeans++")])
def test_each_group_clusters_as_it_would_alone(mixed_groups, method, init):
  x, h, sizes = mixed_groups
  key = jax.random.PRNGKey(3)
  out = gkq.grouped_kmeans_1d(x, h, sizes, 8, method=method, init=init, key=key)
  start = 0
  for g, n in enumerate(sizes):
    part = slice(start, start + n)
    alone = gkq.kmeans_1d(x[part], h[part], 8, method=method, init=init, key=key)
    np.testing.assert_array_equal(np.asarray(out.centroids[g]), np.asarray(alone.centroids))
    np.testing.assert_array_equal(np.asarray(out.assignments[part]),
                                  np.asarray(alone.assignments))
    start += n
  # Fewer values than clusters: each value is its own centroid (to rounding;
  # centroids are computed relative to the group's centre).
  c, a = np.asarray(out.centroids[0]), np.asarray(out.assignments[:3])
  np.testing.assert_allclose(c[a], x[:3], rtol=1e-6)
  np.testing.assert_array_equal(c[3:], np.full(5, x[:3].max()))


def test_a_group_clusters_the_same_whatever_else_is_in_the_call():
  # The DP start's resolution is each group's own (issue 23: a 1-device run of a whole
  # layer and a sharded run of its channels gave different codebooks on small groups).
  rng = np.random.default_rng(0)
  x = rng.standard_normal(64 * 128).astype(np.float32)
  extra = rng.standard_normal(344).astype(np.float32)
  alone = gkq.grouped_kmeans_1d(jnp.asarray(x), None, [128] * 64, 16)
  mixed = gkq.grouped_kmeans_1d(jnp.asarray(np.concatenate([x, extra])), None,
                                [128] * 64 + [344], 16)
  np.testing.assert_array_equal(np.asarray(alone.centroids), np.asarray(mixed.centroids)[:64])


def _group_ratios(x, h, sizes, k, out):
  """Each group's weighted SSE over its exact optimum (exact1d on its values)."""
  from gkq_jax import exact1d
  best = exact1d.optimal_centroids(x, h, sizes, np.full(len(sizes), k), K=k,
                                   exact_max_points=10**6)
  ratios, start = [], 0
  c, a = np.asarray(out.centroids), np.asarray(out.assignments)
  for g, n in enumerate(sizes):
    xs, hs = x[start:start + n].astype(np.float64), h[start:start + n].astype(np.float64)
    opt = np.sort(best[g])
    nearest = np.searchsorted((opt[1:] + opt[:-1]) / 2, xs)
    ratios.append(sse(xs, hs, c[g], a[start:start + n]) / sse(xs, hs, opt, nearest))
    start += n
  return np.asarray(ratios)


def _hard_groups(sizes, seed):
  """Groups drawn normal, heavy-tailed (Student t, 3 dof), Laplace and bimodal
  in turn, with importances spread over three orders of magnitude."""
  rng = np.random.default_rng(seed)
  draws = (lambda n: rng.normal(size=n), lambda n: rng.standard_t(3, size=n),
           lambda n: rng.laplace(size=n),
           lambda n: np.concatenate([rng.normal(-2, 0.3, n // 2), rng.normal(1, 0.5, n - n // 2)]))
  x = np.concatenate([draws[g % 4](n) for g, n in enumerate(sizes)]).astype(np.float32)
  h = (rng.random(x.size) ** 2 + 1e-3).astype(np.float32)
  return x, h


@pytest.mark.parametrize("k", [4, 16])
def test_small_groups_get_their_exact_optimum(k):
  # Up to exact_up_to (256) values, a group starts from the DP over its own sorted
  # values: a first convolution's 3x3x16 = 144 weights, a group of 128, a 1x1 conv's 64.
  sizes = [40, 64, 128, 144, 147, 200, 256, 256] * 3
  x, h = _hard_groups(sizes, seed=k)
  ratios = _group_ratios(x, h, sizes, k, gkq.grouped_kmeans_1d(x, h, sizes, k))
  assert ratios.max() <= 1.001, ratios.round(4)


def test_every_group_is_within_one_percent_of_its_optimum():
  # Larger groups start from the DP over a companded grid of their histogram;
  # heavy tails used to leave them 1.5x - 3x above the optimum (a start on an
  # evenly spaced grid crowded every boundary into the outliers' range).
  sizes = [300, 576, 1152, 4608] * 4
  x, h = _hard_groups(sizes, seed=0)
  ratios = _group_ratios(x, h, sizes, 16, gkq.grouped_kmeans_1d(x, h, sizes, 16))
  assert ratios.max() <= 1.01, ratios.round(4)


def test_exact_up_to_is_checked():
  with pytest.raises(ValueError, match="exact_up_to"):
    gkq.grouped_kmeans_1d(np.zeros(8, np.float32), None, [8], 2, exact_up_to=-1)


@pytest.mark.parametrize("objective", ["l2", "l1"])
def test_companded_grid_matches_its_sort_and_search_definition(objective):
  # The DP start's grid is built by counting and merging (no sort, no binary
  # search); it must equal its definition: 0, the first bin whose companded
  # running sum reaches q / (half + 1) of the total (+1), and the even
  # positions q * bins // half, sorted. Groups of every resolution, an empty
  # one (zero total), and a histogram holding some groups only (take).
  from gkq_jax import _histogram as hist_lib
  from gkq_jax import _inits, _layout
  rng = np.random.default_rng(3)
  sizes = (40, 300, 1000, 5000, 64)
  k = 8
  _, arrays = _layout.make(sizes, k)
  weight = rng.standard_t(2, int(arrays.bins.sum())).astype(np.float32) ** 2
  base, bins = np.asarray(arrays.hist_base), np.asarray(arrays.bins)
  weight[base[4]:base[4] + bins[4]] = 0.0  # no mass at all
  # Equal bins: running sums land on the targets up to rounding (ties either way).
  weight[base[2]:base[2] + bins[2]] = 0.3
  weight[base[1]:base[1] + bins[1]] = 1 / 3
  zeros = jnp.zeros_like(weight)
  hist = hist_lib.make_histogram(jnp.asarray(weight), zeros, arrays.hist_base, arrays.bins,
                                 jnp.ones(len(sizes)), arrays.first_tile)
  coarse, levels = _inits.dp_resolutions(k, int(bins.max()))
  final = coarse * 2 ** levels
  for groups in (np.arange(len(sizes)), np.array([3, 1, 4])):
    part = hist.take(jnp.asarray(groups))
    own_final = jnp.maximum(coarse, jnp.minimum(final, part.bins))
    grid = np.asarray(_inits._companded_grid(part, own_final, final, objective))
    cum = np.asarray(hist_lib.segmented_cumsum(
        jnp.maximum(hist.weight, 0.0) ** (1 / 3 if objective == "l2" else 1 / 2),
        hist.first_tile))
    for row, g in enumerate(groups):
      B, half = int(bins[g]), int(own_final[row]) // 2
      own = cum[base[g]:base[g] + B]
      q = np.arange(1, final // 2 + 1)
      target = q.astype(np.float32) / np.float32(half + 1) * own[-1]
      first = np.minimum(np.searchsorted(own[:-1], target, side="left"), B - 1) + 1
      companded = np.where(q <= half, np.minimum(first, B), B)
      even = np.where(q <= half, q * B // max(half, 1), B)
      want = np.sort(np.concatenate([[0], companded, even]))
      np.testing.assert_array_equal(grid[row], want, err_msg=f"group {g}")


def test_targets_reached_corrects_a_guess_one_off():
  from gkq_jax import _inits
  rng = np.random.default_rng(0)
  c = jnp.asarray(np.cumsum(rng.random(300, dtype=np.float32)))
  t, hh = c[-1], 100
  truth = ((jnp.arange(1, hh + 1) / (hh + 1) * t)[None, :] <= c[:, None]).sum(1)
  for off in (-1, 0, 1):
    guess = jnp.clip(truth + off, 0, hh)
    np.testing.assert_array_equal(_inits.targets_reached(guess, c, t, hh), truth)
