"""The result type every clusterer returns, and the input checks they share."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np


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
    return
  a = np.asarray(array)
  if (a < 0).any():
    raise ValueError(f"{name} must be non-negative (use |g| or g^2), found "
                     f"{int((a < 0).sum())} negative entries.")
