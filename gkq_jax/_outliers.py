"""Dense-and-sparse (SqueezeLLM): which weights a clustered leaf keeps exactly.

Shared by :func:`gkq_jax.quantize` and :func:`gkq_jax.cluster_per_channel`.
The kept weights are picked on the host (their number must be static), by
score: sensitivity ``h w^2`` (h = 1 where there is no importance) or
magnitude ``|w|``.
"""

from __future__ import annotations

import numpy as np

from gkq_jax._clustering import is_traced

SPARSE_SCORES = ("sensitivity", "magnitude")
SPARSE_SCOPES = ("matrix", "global")


def check_sparse(fraction, by, scope, granularity, budget_bytes) -> float:
  """The options' errors (one wording for every caller); the fraction as a float."""
  if (isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer,
                                                              np.floating))
      or not 0 <= fraction < 1):
    raise ValueError(f"sparse_fraction must be a number in [0, 1) (the share of weights kept "
                     f"exactly; 0: none), got {fraction!r}.")
  if by not in SPARSE_SCORES:
    raise ValueError(f"sparse_by={by!r} is not one of {SPARSE_SCORES}.")
  if scope not in SPARSE_SCOPES:
    raise ValueError(f"sparse_scope={scope!r} is not one of {SPARSE_SCOPES}.")
  if fraction > 0 and granularity in ("vector", "row"):
    raise ValueError(f"dense-and-sparse (sparse_fraction > 0) keeps scalar weights; "
                     f"granularity={granularity!r} clusters vectors. Use 'layer' or 'channel'.")
  if fraction > 0 and budget_bytes is not None:
    raise ValueError("budget_bytes does not take sparse_fraction: quantize to a byte budget "
                     "without a sparse part, or use rules with sparse_fraction.")
  return float(fraction)


def sparse_positions(paths, leaves, imps, masks, fraction, by, scope) -> list[np.ndarray]:
  """The flat positions (sorted, int64) each leaf keeps exactly: the top scores,
  ``round(fraction * size)`` per leaf ("matrix") or of all leaves ("global");
  pruned weights never."""
  scores = []
  for path, leaf, imp, mask in zip(paths, leaves, imps, masks):
    if is_traced(leaf) or (imp is not None and is_traced(imp)):
      raise ValueError(f"{path}: dense-and-sparse picks its kept weights on the host; call "
                       "quantize with sparse_fraction outside jax.jit.")
    w = np.asarray(leaf, np.float32).reshape(-1).astype(np.float64)
    if by == "magnitude":
      score = np.abs(w)
    else:
      h = 1.0 if imp is None else np.asarray(imp, np.float32).reshape(-1).astype(np.float64)
      score = h * w * w
    if mask is not None:
      score = np.where(np.asarray(mask).reshape(-1), score, -np.inf)
    scores.append(score)

  def top(score, n):
    n = min(n, int(np.sum(score > -np.inf)))
    if n <= 0:
      return np.zeros(0, np.int64)
    return np.sort(np.argpartition(-score, n - 1)[:n]).astype(np.int64)

  def count(size):
    return int(np.floor(fraction * size + 0.5))

  if scope == "matrix":
    return [top(score, count(score.size)) for score in scores]
  chosen = top(np.concatenate(scores), count(sum(s.size for s in scores)))
  starts = np.cumsum([0] + [s.size for s in scores])
  return [chosen[(chosen >= a) & (chosen < b)] - a for a, b in zip(starts[:-1], starts[1:])]
