"""Independent reference implementations the tests compare against."""

import itertools

import numpy as np


def sse(x, h, c, a):
  """Weighted SSE of assignment ``a`` to centroids ``c``."""
  return float((h * (x - np.asarray(c)[np.asarray(a)]) ** 2).sum())


def brute_force_optimum(x, h, k, objective):
  """Best contiguous partition of the sorted points, by enumeration."""
  order = np.argsort(x)
  xs, hs = x[order].astype(np.float64), h[order].astype(np.float64)
  best = np.inf
  for cuts in itertools.combinations(range(1, len(xs)), k - 1):
    total = 0.0
    for part_x, part_h in zip(np.split(xs, cuts), np.split(hs, cuts)):
      if objective == "l2":
        mu = (part_h * part_x).sum() / part_h.sum()
        total += (part_h * (part_x - mu) ** 2).sum()
      else:
        total += min((part_h * np.abs(part_x - m)).sum() for m in part_x)
    best = min(best, total)
  return best


def numpy_weighted_lloyd(x, h, c, iters):
  """Textbook Lloyd with a full distance matrix."""
  c = np.array(c, np.float64)
  for _ in range(iters):
    a = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
    for k in range(len(c)):
      m = a == k
      if h[m].sum() > 0:
        c[k] = (h[m] * x[m]).sum() / h[m].sum()
  return np.sort(c)


def numpy_ecsq(x, h, c, lam, iters, pinned_zero=False, pinned_count=0):
  """Chou, Lookabaugh & Gray's ECSQ iteration with a full N x K cost matrix:
  assignment by h (x - c)^2 + lam (-log2 p), then weighted means and shares.
  Returns (centroids, assignments) with the original cluster numbering."""
  c = np.array(c, np.float64)
  K = len(c)
  p = np.full(K, 1.0 / K)
  for _ in range(iters):
    with np.errstate(divide="ignore"):
      code = np.where(p > 0, -np.log2(np.where(p > 0, p, 1.0)), np.inf)
    rate = lam * code if lam > 0 else np.zeros(K)  # lam = 0: plain k-means
    cost = h[:, None] * (x[:, None] - c[None, :]) ** 2 + rate[None, :]
    a = np.argmin(cost, axis=1)
    counts = np.bincount(a, minlength=K).astype(np.float64)
    for k in range(K):
      m = a == k
      if h[m].sum() > 0:
        c[k] = (h[m] * x[m]).sum() / h[m].sum()
    if pinned_zero:
      c[0] = 0.0
      counts[0] += pinned_count
    p = counts / counts.sum()
  return c, a
