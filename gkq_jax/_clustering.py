"""The result type every clusterer returns, and the input checks they share.

The checks raise a ValueError on concrete inputs. Under ``jax.jit`` (traced
inputs) they become ``jax.experimental.checkify.debug_check`` s: free and
silent in a plain jitted call, reported by ``checkify.checkify(f)`` (``err,
out = checkify.checkify(jax.jit(f))(...); err.throw()``).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


class Clustering(NamedTuple):
  """Codebooks and assignments.

  Grouped 1-D clustering: centroids (G, K) float32, sorted per group, entries
  past a group's own number of clusters repeating its largest centroid;
  assignments (N,) int32 into the group's row. Vector clustering: centroids
  (K, d) and assignments (P,).
  """

  centroids: jax.Array
  assignments: jax.Array


def is_traced(*arrays) -> bool:
  """True when any array is a tracer: checks that need values are skipped then."""
  return any(isinstance(a, jax.core.Tracer) for a in arrays)


def check_finite(name: str, array) -> None:
  """Raises a ValueError naming the first NaN/inf entry of a concrete array."""
  if is_traced(array):
    bad = ~jnp.isfinite(array)
    first = jnp.unravel_index(jnp.argmax(bad.reshape(-1)), jnp.shape(array))
    position = ", ".join(["{}"] * len(first)) + ("," if len(first) == 1 else "")
    checkify.debug_check(~jnp.any(bad), f"{name} has {{}} non-finite entries (NaN or inf), "
                         f"first at index ({position}); clean or clip them before clustering.",
                         jnp.sum(bad), *first)
    return
  if isinstance(array, jax.Array):  # counted where the array lies: a sharded one is not gathered
    count = int(jnp.sum(~jnp.isfinite(array)))
    if count:
      flat = int(jnp.argmax(~jnp.isfinite(array).reshape(-1)))
      first = np.unravel_index(flat, jnp.shape(array)) if jnp.ndim(array) else ()
      raise ValueError(f"{name} has {count} non-finite entries (NaN or inf), first at index "
                       f"{tuple(int(i) for i in first)}; clean or clip them before clustering.")
    return
  a = np.asarray(array)
  bad = ~np.isfinite(a)
  if bad.any():
    first = np.unravel_index(int(np.argmax(bad)), a.shape) if a.ndim else ()
    raise ValueError(f"{name} has {int(bad.sum())} non-finite entries (NaN or inf), "
                     f"first at index {tuple(int(i) for i in first)}; "
                     "clean or clip them before clustering.")


def check_nonnegative(name: str, array) -> None:
  """Importance is a weight: negative entries have no meaning."""
  if is_traced(array):
    checkify.debug_check(jnp.all(array >= 0), f"{name} must be non-negative (use |g| or g^2), "
                         "found {} negative entries.", jnp.sum(array < 0))
    return
  negative = int(jnp.sum(array < 0)) if isinstance(array, jax.Array) else int(
      (np.asarray(array) < 0).sum())
  if negative:
    raise ValueError(f"{name} must be non-negative (use |g| or g^2), found "
                     f"{negative} negative entries.")


def warn_unweighted(caller: str, paths, importances, stacklevel: int = 3) -> None:
  """Warns when some clustered leaves have importance and others have None.

  ``None`` means "no importance" and is what :func:`gkq_jax.compute_importance`
  gives leaves that are never clustered (nnx RNG keys, counts). For a leaf the
  rules do cluster while its siblings are weighted it is almost always a
  mistake (a tree built by hand, a filter gone wrong), and that leaf would be
  clustered unweighted without a word. A warning, not an error: plain k-means
  on one leaf is a legitimate choice, said explicitly with an array of ones.
  """
  missing = [path for path, imp in zip(paths, importances) if imp is None]
  if not missing or len(missing) == len(paths):
    return
  more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
  warnings.warn(
      f"{caller}: the importance of {missing[0]!r}{more} is None but the rules cluster it "
      "while the other clustered leaves have importance, so it is clustered unweighted "
      "(plain k-means); give it an importance array (jnp.ones_like(leaf) for unweighted on "
      "purpose) or pass importance=None for plain k-means everywhere.", stacklevel=stacklevel)
