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
  # In the clustering itself: a point between two groups joins the one that is
  # nearer in the coordinate its importance weights (y), not in plain distance.
  rng = np.random.default_rng(0)
  pts = np.concatenate([rng.normal(0.0, 0.3, (20, 2)), rng.normal((10.0, 3.0), 0.3, (20, 2)),
                        [[4.0, 2.5]]]).astype(np.float32)
  h = np.ones_like(pts)
  h[-1] = (0.05, 4.0)
  plain = np.asarray(gkq.kmeans_vectors(pts, None, 2, max_iter=20).assignments)
  out = gkq.kmeans_vectors(pts, h, 2, max_iter=20)
  weighted = np.asarray(out.assignments)
  assert plain[-1] == plain[0] != plain[20] and weighted[-1] == weighted[20] != weighted[0]
  ref_c, ref_a = numpy_weighted_vector_lloyd(pts.astype(np.float64), h.astype(np.float64),
                                             np.asarray(out.centroids, np.float64), 1)
  np.testing.assert_array_equal(weighted, ref_a)
  np.testing.assert_allclose(np.asarray(out.centroids), ref_c, rtol=1e-5)


def test_vector_input_checks():
  points = np.ones((10, 3), np.float32)
  with pytest.raises(ValueError, match="importance must be non-negative"):
    gkq.kmeans_vectors(points, -np.ones_like(points), 2)
  from jax.experimental import checkify
  points[4, 1] = np.nan
  err, _ = checkify.checkify(jax.jit(lambda p: gkq.kmeans_vectors(p, None, 2).centroids))(points)
  with pytest.raises(checkify.JaxRuntimeError, match=r"points has 1 non-finite.*\(4, 1\)"):
    err.throw()


def test_random_vector_starts_are_a_pure_function_of_the_key():
  points = np.random.default_rng(1).standard_normal((200, 4)).astype(np.float32)

  def start(seed):  # max_iter=0: the starting codebook itself
    return np.asarray(gkq.kmeans_vectors(points, None, 5, init="forgy", max_iter=0,
                                         key=jax.random.PRNGKey(seed)).centroids)

  np.testing.assert_array_equal(start(1), start(1))
  assert not np.array_equal(start(1), start(2))
