"""Clustering speed and quality on every Dense/Conv kernel of a ResNet-34.

    python benchmarks/cluster_speed.py [--ks 16,256] [--sklearn-seconds 300]

All methods see the same weights (an initialised ImageNet-head ResNet-34,
21.8 M weights in 37 kernels), the same random positive importance and the
same K, per layer. Times are wall-clock seconds: "warm" is the best of
--repeats calls after the first; "first" includes JIT / numba compilation.
scikit-learn is given a time budget: when it runs out, its time and SSE are
extrapolated from the layers it finished (marked with ~).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import gkq_jax as gkq  # noqa: E402
from gkq_jax.job.models import ResNet34  # noqa: E402


def resnet34_kernels():
  model = ResNet34(num_classes=1000, stem="imagenet")
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return [np.asarray(leaf).reshape(-1) for path, leaf in flat
          if jax.tree_util.keystr(path).endswith("['kernel']")]


def timed(fn, repeats):
  start = time.perf_counter()
  out = fn()
  first = time.perf_counter() - start
  warm = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    warm.append(time.perf_counter() - start)
  return out, first, min(warm) if warm else first


def sse_of(layers, weights, centroids, labels):
  """Weighted SSE of every layer (float64)."""
  return [float((h.astype(np.float64) * (x - c[a]) ** 2).sum())
          for x, h, c, a in zip(layers, weights, centroids, labels)]


def run_gkq(layers, weights, k, method, repeats):
  x = jnp.asarray(np.concatenate(layers))
  h = jnp.asarray(np.concatenate(weights))
  sizes = tuple(len(l) for l in layers)

  def call():
    out = gkq.grouped_kmeans_1d(x, h, sizes, k, method=method)
    return jax.block_until_ready(out)

  out, first, warm = timed(call, repeats)
  c, a = np.asarray(out.centroids), np.asarray(out.assignments)
  bounds = np.cumsum((0,) + sizes)
  labels = [a[s:e] for s, e in zip(bounds[:-1], bounds[1:])]
  return first, warm, sse_of(layers, weights, list(c), labels)


def run_flash(layers, weights, k, repeats):
  import flash1dkmeans

  def call():
    return [flash1dkmeans.kmeans_1d(x, k, sample_weights=h, random_state=0)
            for x, h in zip(layers, weights)]

  out, first, warm = timed(call, repeats)
  return first, warm, sse_of(layers, weights, [c for c, _ in out], [a for _, a in out])


def run_sklearn(layers, weights, k, budget):
  from sklearn.cluster import KMeans
  start, per_layer, n_done = time.perf_counter(), [], 0
  for x, h in zip(layers, weights):
    km = KMeans(n_clusters=k, n_init=1, random_state=0).fit(x[:, None], sample_weight=h)
    per_layer += sse_of([x], [h], [km.cluster_centers_[:, 0]], [km.labels_])
    n_done += x.size
    if time.perf_counter() - start > budget:
      break
  elapsed = time.perf_counter() - start
  total = sum(x.size for x in layers)
  if len(per_layer) < len(layers):
    return elapsed * total / n_done, per_layer, (
        f"time extrapolated from the first {len(per_layer)} layers ({n_done / total:.0%} of "
        "the weights); SSE columns compare those layers only")
  return elapsed, per_layer, ""


def run_sort(layers, repeats):
  _, first, warm = timed(lambda: [np.sort(x) for x in layers], repeats)
  return first, warm


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ks", default="16,256")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--sklearn-seconds", type=float, default=300.0)
  args = parser.parse_args()

  layers = resnet34_kernels()
  rng = np.random.default_rng(0)
  weights = [(rng.random(x.size, dtype=np.float32) + 1e-3) for x in layers]
  n = sum(x.size for x in layers)
  print(f"ResNet-34: {len(layers)} kernels, {n:,} weights; {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs\n")
  sort_first, sort_warm = run_sort(layers, args.repeats)
  rows = []
  for k in [int(v) for v in args.ks.split(",")]:
    res = {}
    for method in ("hist", "exact"):
      res[f"gkq {method}"] = run_gkq(layers, weights, k, method,
                                     args.repeats if method == "hist" else 1) + ("",)
    res["flash1dkmeans"] = run_flash(layers, weights, k, args.repeats) + ("",)
    sk_time, sk_sse, note = run_sklearn(layers, weights, k, args.sklearn_seconds)
    res["sklearn KMeans"] = (sk_time, sk_time, sk_sse, note)
    # Compare quality on the layers every method finished.
    n_common = len(sk_sse)
    flash_warm, flash_sse = res["flash1dkmeans"][1], sum(res["flash1dkmeans"][2][:n_common])
    for name, (first, warm, sse, note) in res.items():
      total = sum(sse[:n_common])
      rows.append((name, k, warm, first, total, sk_time / warm, flash_warm / warm,
                   sort_warm / warm, total / flash_sse, note))
    rows.append(("np.sort (floor)", k, sort_warm, sort_first, float("nan"), sk_time / sort_warm,
                 flash_warm / sort_warm, 1.0, float("nan"), ""))

  header = ("method", "K", "warm s", "first s", "weighted SSE", "x faster than sklearn",
            "x faster than flash", "x faster than sort", "SSE / flash", "")
  print("| " + " | ".join(header[:-1]) + " |")
  print("|" + "---|" * (len(header) - 1))
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.6g} | {r[5]:.1f} | "
          f"{r[6]:.2f} | {r[7]:.2f} | {r[8]:.4f} | {r[9]}".rstrip() + " |")


if __name__ == "__main__":
  main()
