"""Importance-weighted vector k-means (gkq_jax.kmeans_vectors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gkq_jax as gkq
from gkq_jax.kmeans_vectors import weighted_sq_distances


def numpy_weighted_vector_lloyd(x, h, c, iters):
  for _ in range(iters):
    d = (h[:, None, :] * (x[:, None, :] - c[None]) ** 2).sum(-1)
    a = d.argmin(1)
    for k in range(len(c)):
      m = a == k
      w = h[m].sum(0)
      c[k] = np.where(w > 0, (h[m] * x[m]).sum(0) / np.where(w > 0, w, 1), c[k])
  return c, a


def test_vector_kmeans_matches_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((300, 4)).astype(np.float32)
  h = rng.random((300, 4)).astype(np.float32)
  out = gkq.kmeans_vectors(x, h, 6, init="forgy", max_iter=50, tol=0.0)
  # Start the reference from the same points the forgy draw picked.
  key = jax.random.PRNGKey(0)
  idx = np.asarray(jax.random.choice(key, 300, (6,), replace=False))
  ref_c, ref_a = numpy_weighted_vector_lloyd(x.astype(np.float64), h.astype(np.float64),
                                             x[idx].astype(np.float64), 50)
  np.testing.assert_allclose(np.asarray(out.centroids), ref_c, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(out.assignments), ref_a)


def test_importance_changes_vector_assignment():
  # The point is nearer c0 in plain distance, nearer c1 where it matters.
  points = np.array([[0.0, 0.0], [10.0, 0.0], [4.0, 1.5]], np.float32)
  c = jnp.array([[0.0, 0.0], [10.0, 0.0]])
  plain = weighted_sq_distances(
      jnp.asarray(points), jnp.ones_like(points), c)
  weighted = weighted_sq_distances(
      jnp.asarray(points), jnp.asarray([[1, 1], [1, 1], [0.01, 100.0]], jnp.float32), c)
  assert int(jnp.argmin(plain[2])) == 0
  assert float(weighted[2, 0]) == pytest.approx(0.01 * 16 + 100 * 2.25)
  assert float(weighted[2, 1]) == pytest.approx(0.01 * 36 + 100 * 2.25)
  # Per-coordinate weights steer the centroid update too.
  h = np.array([[1, 1], [1, 1], [0.01, 100.0], [1, 1]], np.float32)
  pts = np.concatenate([points, [[10.0, 3.0]]]).astype(np.float32)
  out = gkq.kmeans_vectors(pts, h, 2, max_iter=20)
  assert np.isfinite(np.asarray(out.centroids)).all()


def test_vector_input_checks():
  points = np.ones((10, 3), np.float32)
  with pytest.raises(ValueError, match="importance must be non-negative"):
    gkq.kmeans_vectors(points, -np.ones_like(points), 2)
  from jax.experimental import checkify
  points[4, 1] = np.nan
  err, _ = checkify.checkify(jax.jit(lambda p: gkq.kmeans_vectors(p, None, 2).centroids))(points)
  with pytest.raises(checkify.JaxRuntimeError, match=r"points has 1 non-finite.*\(4, 1\)"):
    err.throw()
