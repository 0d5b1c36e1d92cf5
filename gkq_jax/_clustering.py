"""The result type every clusterer returns, and the input checks they share.

The checks raise a ValueError on concrete inputs. Under ``jax.jit`` (traced
inputs) they become ``jax.experimental.checkify.debug_check`` s: free and
silent in a plain jitted call, reported by ``checkify.checkify(f)`` (``err,
out = checkify.checkify(jax.jit(f))(...); err.throw()``).
"""

from __future__ import annotations

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
  a = np.asarray(array)
  if (a < 0).any():
    raise ValueError(f"{name} must be non-negative (use |g| or g^2), found "
                     f"{int((a < 0).sum())} negative entries.")
