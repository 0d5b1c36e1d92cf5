"""Entropy-constrained clustering and uniform quantization (gkq_jax.ecsq)."""

import numpy as np
import pytest

import gkq_jax as gkq
from tests.references import numpy_ecsq, numpy_weighted_lloyd, sse

SIZES = (700, 500)
K = 8  # one compilation serves most tests


@pytest.fixture(scope="module")
def layers():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.standard_normal(SIZES[0]) * 0.1,
                      rng.laplace(size=SIZES[1]) * 0.3]).astype(np.float32)
  h = (rng.random(x.size) ** 2 + 1e-3).astype(np.float32)
  return x, h


def _linear_start(x, pin=(True, False)):
  """(groups, K) evenly spaced codebooks, a leading 0 where pinned."""
  rows, start = [], 0
  for n, p in zip(SIZES, pin):
    xs = x[start:start + n]
    start += n
    rows.append(np.concatenate([[0.0], np.linspace(xs.min(), xs.max(), K - 1)]) if p
                else np.linspace(xs.min(), xs.max(), K))
  return np.array(rows, np.float32)


def _group(out, g):
  start = sum(SIZES[:g])
  return out.centroids[g], out.assignments[start:start + SIZES[g]]


def test_objective_never_increases(layers):
  """Each iteration (assignment, then centroids and shares) lowers J or keeps it."""
  x, h = layers
  lam, pinned = np.array([2e-3, 3e-2]), np.array([300.0, 0.0])
  history = []
  for iters in range(1, 9):
    out = gkq.grouped_ecsq_1d(x, h, SIZES, K, lam, pin_zero=(True, False), pinned_zeros=pinned,
                              init_centroids=_linear_start(x), max_iter=iters, tol=0.0)
    start, J = 0, []
    for g, n in enumerate(SIZES):
      c, a = _group(out, g)
      J.append(gkq.ecsq_objective(x[start:start + n], h[start:start + n], c, a, lam[g],
                                  int(pinned[g])))
      start += n
    history.append(J)
  history = np.array(history)
  assert np.all(np.diff(history, axis=0) <= 1e-6 * history[:-1]), history
  assert np.all(history[-1] < history[0])
  # The pinned zero stays exactly 0 and first; ECSQ emptied some clusters.
  assert float(out.centroids[0, 0]) == 0.0 and max(np.asarray(out.num_used)) < K


def test_lambda_zero_is_weighted_kmeans(layers):
  x, h = layers
  start = _linear_start(x, pin=(False, False))
  ours = gkq.grouped_ecsq_1d(x, h, SIZES, K, 0.0, init_centroids=start, max_iter=40, tol=0.0)
  kmeans = gkq.grouped_kmeans_1d(x, h, SIZES, K, method="lloyd", init="linear", max_iter=40,
                                 tol=0.0)
  np.testing.assert_array_equal(np.asarray(ours.assignments), np.asarray(kmeans.assignments))
  for g in range(2):
    xs, hs = x[sum(SIZES[:g]):][:SIZES[g]], h[sum(SIZES[:g]):][:SIZES[g]]
    ref = numpy_weighted_lloyd(xs.astype(np.float64), hs.astype(np.float64), start[g], 40)
    np.testing.assert_allclose(np.asarray(ours.centroids[g]), ref, rtol=1e-4, atol=1e-6)
  # From the default start (the weighted k-means codebook) lam = 0 only goes on
  # with Lloyd steps: the weighted SSE can only fall.
  default = gkq.grouped_ecsq_1d(x, h, SIZES, K, 0.0)
  best = gkq.grouped_kmeans_1d(x, h, SIZES, K)
  for g in range(2):
    c, a = _group(default, g)
    c_best, a_best = _group(best, g)
    xs, hs = x[sum(SIZES[:g]):][:SIZES[g]], h[sum(SIZES[:g]):][:SIZES[g]]
    assert sse(xs, hs, c, a) <= sse(xs, hs, c_best, a_best) * (1 + 1e-6)


def test_matches_numpy_reference_with_pinned_zero(layers):
  x, h = layers
  start = _linear_start(x)
  out = gkq.grouped_ecsq_1d(x, h, SIZES, K, 3e-3, pin_zero=(True, False), pinned_zeros=(50, 0),
                            init_centroids=start, max_iter=6, tol=0.0)
  x, h = x[:SIZES[0]], h[:SIZES[0]]
  c, a = numpy_ecsq(x.astype(np.float64), h.astype(np.float64), start[0], 3e-3, 6,
                    pinned_zero=True, pinned_count=50)
  c_ours, a_ours = (np.asarray(v) for v in _group(out, 0))
  ours = out
  # Same partition and values (ours drops empty clusters and sorts them).
  np.testing.assert_allclose(c_ours[a_ours], c[a], rtol=1e-4, atol=1e-6)
  assert int(ours.num_used[0]) == len(np.unique(np.concatenate([[0], a])))
  counts = np.bincount(a_ours) + np.eye(1, a_ours.max() + 1, 0)[0] * 50
  p = counts[counts > 0] / counts.sum()
  assert float(ours.entropy_bits[0]) == pytest.approx(-(counts[counts > 0] * np.log2(p)).sum(),
                                                      rel=1e-4)
  assert float(ours.distortion[0]) == pytest.approx(sse(x, h, c_ours, a_ours), rel=1e-4)


def test_unimportant_weights_go_to_the_cheap_zero(layers):
  x, h = layers
  h = h.copy()
  h[:100] = 0.0  # these cost nothing wherever they go
  out = gkq.grouped_ecsq_1d(x, h, SIZES, K, 1e-3, pin_zero=True, pinned_zeros=(400, 400),
                            init_centroids=_linear_start(x, (True, True)))
  assert np.all(np.asarray(out.assignments[:100]) == 0)


def test_rate_targets_are_met(layers):
  x, h = layers
  for target in (1.0, 2.5):
    out, lam = gkq.ecsq_for_rate(x, h, SIZES, target, num_clusters=K)
    rate = float(np.sum(out.entropy_bits)) / x.size
    assert lam > 0 and target * 0.95 <= rate <= target
  out, step = gkq.uniform_for_rate(x, h, SIZES, 2.0, pin_zero=True)
  assert 1.9 <= float(np.sum(out.entropy_bits)) / x.size <= 2.0


def test_uniform_cells(layers):
  x, h = layers
  out = gkq.grouped_uniform_1d(x, h, SIZES, (0.05, 0.2), pin_zero=(False, True))
  for g, step in enumerate((0.05, 0.2)):
    start = sum(SIZES[:g])
    xs, hs = x[start:start + SIZES[g]], h[start:start + SIZES[g]]
    c, a = (np.asarray(v) for v in _group(out, g))
    cell = np.round(xs / step)
    for value in np.unique(cell):  # one index per cell, its weighted mean
      members = cell == value
      assert len(np.unique(a[members])) == 1
      expected = 0.0 if (g == 1 and value == 0) else np.average(xs[members], weights=hs[members])
      assert c[a[members][0]] == pytest.approx(expected, abs=1e-6)
  assert float(out.centroids[1, 0]) == 0.0


@pytest.mark.parametrize("call, message", [
    (lambda x: gkq.ecsq_1d(x, None, 4, -1.0), "lam must be >= 0"),
    (lambda x: gkq.ecsq_for_rate(x, None, (x.size,), 0.0), "bits_per_weight"),
    (lambda x: gkq.grouped_uniform_1d(x, None, (x.size,), 0.0), "step must be > 0"),
    (lambda x: gkq.grouped_ecsq_1d(x, None, (x.size,), 4, 0.1, pinned_zeros=3), "pin_zero"),
])
def test_bad_input(call, message):
  x = np.random.default_rng(1).standard_normal(64).astype(np.float32)
  with pytest.raises(ValueError, match=message):
    call(x)
