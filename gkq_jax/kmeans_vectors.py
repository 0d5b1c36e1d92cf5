"""Importance-weighted k-means of vectors (e.g. the 3x3 filters of a conv kernel).

Distance ``sum_d h_d (x_d - c_d)^2`` with a per-coordinate importance h, so,
unlike the scalar case, the weighting changes which centroid is nearest. Each
centroid coordinate is the importance-weighted mean of its members' coordinate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gkq_jax._clustering import Clustering, check_finite, check_nonnegative

VECTOR_INITS = ("kmeans++", "forgy")


def weighted_sq_distances(x, h, c):
  """(P, K) matrix of sum_d h_pd (x_pd - c_kd)^2, without a (P, K, d) tensor."""
  return ((h * x * x).sum(1)[:, None] - 2 * (h * x) @ c.T + h @ (c * c).T)


def _init_forgy(key, x, K):
  idx = jax.random.choice(key, x.shape[0], (K,), replace=x.shape[0] < K)
  return x[idx]


def _init_kmeanspp(key, x, h, K):
  mass = h.sum(1)
  mass = jnp.where(mass.sum() > 0, mass, jnp.ones_like(mass))
  keys = jax.random.split(key, K)

  def pick(key, p):
    safe = jnp.where(p > 0, p, 0.0)
    logits = jnp.where(safe > 0, jnp.log(jnp.where(safe > 0, safe, 1.0)), -jnp.inf)
    logits = jnp.where(jnp.any(safe > 0), logits, jnp.zeros_like(logits))
    return jax.random.categorical(key, logits)

  first = x[pick(keys[0], mass)]
  c = jnp.zeros((K, x.shape[1]), x.dtype).at[0].set(first)
  d = weighted_sq_distances(x, h, first[None])[:, 0]

  def body(k, carry):
    c, d = carry
    new = x[pick(keys[k], jnp.maximum(d, 0.0))]
    return c.at[k].set(new), jnp.minimum(d, weighted_sq_distances(x, h, new[None])[:, 0])

  c, _ = jax.lax.fori_loop(1, K, body, (c, d))
  return c


@functools.partial(jax.jit, static_argnames=("K", "init", "max_iter", "tol"))
def _kmeans_vectors(x, h, key, *, K, init, max_iter, tol):
  h = jnp.where(h.sum() > 0, h, jnp.ones_like(h))
  c = _init_forgy(key, x, K) if init == "forgy" else _init_kmeanspp(key, x, h, K)
  scale = jnp.maximum(jnp.abs(x).max(), 1e-30)

  def update(c):
    a = jnp.argmin(weighted_sq_distances(x, h, c), axis=1)
    w = jax.ops.segment_sum(h, a, K)
    s = jax.ops.segment_sum(h * x, a, K)
    return jnp.where(w > 0, s / jnp.where(w > 0, w, 1.0), c)

  def cond(state):
    it, _, delta = state
    return jnp.logical_and(it < max_iter, delta > tol * scale)

  def body(state):
    it, c, _ = state
    new = update(c)
    return it + 1, new, jnp.abs(new - c).max()

  _, c, _ = jax.lax.while_loop(cond, body, (0, c, jnp.inf))
  return Clustering(c, jnp.argmin(weighted_sq_distances(x, h, c), axis=1).astype(jnp.int32))


def kmeans_vectors(points, importance=None, num_clusters: int = 16, *,
                   init: str = "kmeans++", max_iter: int = 100, tol: float = 1e-6,
                   key=None) -> Clustering:
  """Clusters (P, d) points; returns centroids (K, d) and assignments (P,).

  importance: (P, d) non-negative per-coordinate weights, or None (plain k-means).
  """
  if init not in VECTOR_INITS:
    raise ValueError(f"init={init!r} is not one of {VECTOR_INITS} for vectors.")
  points = jnp.asarray(points, jnp.float32)
  if points.ndim != 2:
    raise ValueError(f"points must be (P, d), got shape {points.shape}.")
  importance = (jnp.ones_like(points) if importance is None
                else jnp.asarray(importance, jnp.float32))
  if importance.shape != points.shape:
    raise ValueError(f"importance has shape {importance.shape}, points {points.shape}.")
  if num_clusters < 1:
    raise ValueError(f"num_clusters must be >= 1, got {num_clusters}.")
  check_finite("points", points)
  check_finite("importance", importance)
  check_nonnegative("importance", importance)
  key = jax.random.PRNGKey(0) if key is None else key
  return _kmeans_vectors(points, importance, key, K=int(num_clusters), init=init,
                         max_iter=int(max_iter), tol=float(tol))
