"""The optimal 1-D clustering (gkq_jax.exact1d), against brute force and ckwrap."""

import numpy as np
import pytest

import gkq_jax as gkq
from tests.references import brute_force_optimum, sse


@pytest.mark.parametrize("objective", ["l2", "l1"])
def test_exact_matches_brute_force(objective):
  rng = np.random.default_rng(2)
  for trial in range(3):
    x = rng.standard_normal(9).astype(np.float32)
    h = (rng.random(9) + 0.05).astype(np.float32)
    out = gkq.kmeans_1d(x, h, 3, method="exact", objective=objective, refine_iters=0)
    got = float(gkq.weighted_error(x, h, out.centroids, out.assignments, objective))
    assert got == pytest.approx(brute_force_optimum(x, h, 3, objective), rel=1e-5, abs=1e-6)


def test_exact_matches_ckwrap(bell):
  ckwrap = pytest.importorskip("ckwrap")
  x, h = bell
  ref = ckwrap.ckmeans(x.astype(np.float64), 16, weights=h.astype(np.float64))
  ref_sse = sse(x, h, ref.centers, ref.labels)
  out = gkq.kmeans_1d(x, h, 16, method="exact")
  assert sse(x, h, out.centroids, out.assignments) == pytest.approx(ref_sse, rel=1e-5)
  np.testing.assert_allclose(np.asarray(out.centroids), np.sort(ref.centers), atol=1e-4)


def test_exact_on_histogram_is_near_ckwrap(bell):
  ckwrap = pytest.importorskip("ckwrap")
  x, h = bell
  ref = ckwrap.ckmeans(x.astype(np.float64), 16, weights=h.astype(np.float64))
  out = gkq.kmeans_1d(x, h, 16, method="exact", exact_max_points=100, bins=1024)
  assert sse(x, h, out.centroids, out.assignments) <= 1.002 * sse(x, h, ref.centers, ref.labels)


def test_exact_under_vmap_and_jit():
  import jax
  rng = np.random.default_rng(5)
  x = rng.standard_normal((3, 40)).astype(np.float32)
  h = rng.random((3, 40)).astype(np.float32)
  one = lambda x, h: gkq.kmeans_1d(x, h, 3, method="exact", refine_iters=0).centroids
  batched = jax.jit(jax.vmap(one))(x, h)
  for b in range(3):
    np.testing.assert_allclose(np.asarray(batched[b]), np.asarray(one(x[b], h[b])), rtol=1e-6)
  shared_h = jax.vmap(one, in_axes=(0, None))(x, h[0])  # one unbatched argument
  np.testing.assert_allclose(np.asarray(shared_h[2]), np.asarray(one(x[2], h[0])), rtol=1e-6)
