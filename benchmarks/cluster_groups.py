"""Grouped 1-D k-means (gkq_jax.grouped_kmeans_1d) per layer, per channel and per
grouped channel on every kernel of a ResNet-34, against flash1dkmeans and
scikit-learn called once per group.

    python benchmarks/cluster_groups.py [--ks 16,4] [--layouts layer,channel,grouped]

Values: the 21.8 M kernel weights of an initialised ImageNet-head ResNet-34
(37 kernels), random positive importance (fixed seed). Groups: "layer" (37),
"channel" (one per output channel, 9,512), "grouped" (each output channel's
fan-in cut into runs of --group-size values, the last run of a channel shorter
where the size does not divide it: 170,528 groups of 128).

Every (layout, K, method) runs in a fresh subprocess: "first" includes JIT /
numba compilation, "warm" is the best of --repeats calls after it (one pass
for flash1dkmeans). "peak MB" is the most memory the warm calls held on top of
the inputs (VmHWM after resetting it via /proc/self/clear_refs, minus the
resident size before the calls) plus the inputs' own bytes (values and
importance, float32); "x inputs" divides it by those bytes. scikit-learn
(KMeans, n_init=1) runs on --sklearn-groups groups drawn at random (seed 0; 3
layers per layer);
its time is extrapolated to all values from that sample, and the "sample SSE"
column compares every method on exactly those groups.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _status(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field):
        return int(line.split()[1]) * 1024
  return 0


def _reset_peak():
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def save_kernels(path):
  import jax
  import jax.numpy as jnp

  from gkq_jax.job.models import ResNet34
  model = ResNet34(num_classes=1000, stem="imagenet")
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  kernels = [np.asarray(leaf) for p, leaf in flat
             if jax.tree_util.keystr(p).endswith("['kernel']")]
  np.savez(path, *kernels)


def grouped_values(path, layout, group_size):
  """(values, importance, group sizes): each output channel's values contiguous."""
  kernels = list(np.load(path).values())
  rows = [np.moveaxis(k, -1, 0).reshape(k.shape[-1], -1) for k in kernels]
  sizes = []
  for r in rows:
    channels, n = r.shape
    if layout == "layer":
      sizes.append(r.size)
    elif layout == "channel":
      sizes += [n] * channels
    else:
      sizes += [min(group_size, n - c) for c in range(0, n, group_size)] * channels
  x = np.concatenate([r.reshape(-1) for r in rows]).astype(np.float32)
  h = np.random.default_rng(0).random(x.size, dtype=np.float32) + 1e-3
  return x, h, np.asarray(sizes)


def group_sse(x, h, sizes, values_per_point):
  """Weighted SSE of each group (float64)."""
  err = h.astype(np.float64) * (x.astype(np.float64) - values_per_point) ** 2
  return np.add.reduceat(err, np.concatenate([[0], np.cumsum(sizes)[:-1]]))


def child(args):
  x, h, sizes = grouped_values(args.kernels, args.layout, args.group_size)
  k = args.k
  if args.method == "gkq":
    import jax
    import jax.numpy as jnp

    import gkq_jax as gkq
    xj, hj, group_sizes = jnp.asarray(x), jnp.asarray(h), tuple(int(s) for s in sizes)
    call = lambda: jax.block_until_ready(gkq.grouped_kmeans_1d(xj, hj, group_sizes, k))
    start = time.perf_counter()
    out = call()
    first = time.perf_counter() - start
    del out
    base = _status("VmRSS")
    ok = _reset_peak()
    warm = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      out = call()
      warm.append(time.perf_counter() - start)
    peak = _status("VmHWM") - base
    c, a = np.asarray(out.centroids), np.asarray(out.assignments)
    seg = np.repeat(np.arange(sizes.size), sizes)
    fitted = c[seg, a]
  else:
    import flash1dkmeans
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    groups = [(x[s:e], h[s:e]) for s, e in itertools.pairwise(bounds)]
    start = time.perf_counter()
    flash1dkmeans.kmeans_1d(groups[0][0], k, sample_weights=groups[0][1], random_state=0)
    first = time.perf_counter() - start  # numba compilation, on one group
    base = _status("VmRSS")
    ok = _reset_peak()
    start = time.perf_counter()
    out = [flash1dkmeans.kmeans_1d(g, k, sample_weights=w, random_state=0) for g, w in groups]
    warm = [time.perf_counter() - start]
    first += warm[0]
    peak = _status("VmHWM") - base
    fitted = np.concatenate([c[a] for c, a in out])
  np.save(args.out, group_sse(x, h, sizes, fitted))
  print(json.dumps({"first": first, "warm": min(warm), "peak": peak if ok else None}))


def run_child(script, kernels, layout, k, method, group_size, repeats, out):
  cmd = [sys.executable, script, "--child", "--kernels", kernels, "--layout", layout,
         "--k", str(k), "--method", method, "--group-size", str(group_size),
         "--repeats", str(repeats), "--out", out]
  res = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if res.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1]), np.load(out)


def sklearn_sample(x, h, sizes, k, picks):
  from sklearn.cluster import KMeans
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  start, sse, n = time.perf_counter(), [], 0
  for g in picks:
    xs, hs = x[bounds[g]:bounds[g + 1]], h[bounds[g]:bounds[g + 1]]
    km = KMeans(n_clusters=min(k, xs.size), n_init=1, random_state=0)
    km.fit(xs[:, None].astype(np.float64), sample_weight=hs)
    sse.append(group_sse(xs, hs, [xs.size], km.cluster_centers_[km.labels_, 0])[0])
    n += xs.size
  return (time.perf_counter() - start) * x.size / n, np.asarray(sse)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ks", default="16,4")
  parser.add_argument("--layouts", default="layer,channel,grouped")
  parser.add_argument("--group-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--sklearn-groups", type=int, default=100)
  parser.add_argument("--json", help="write a results summary here")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--kernels", help=argparse.SUPPRESS)
  parser.add_argument("--layout", help=argparse.SUPPRESS)
  parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--method", help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args)

  tmp = tempfile.mkdtemp(prefix="cluster_groups_")
  kernels = os.path.join(tmp, "kernels.npz")
  save_kernels(kernels)
  script = os.path.abspath(__file__)
  rows, layer_warm = [], {}
  print(f"ResNet-34 kernels, {os.cpu_count()} CPUs; peak = extra memory of the warm calls + "
        "inputs\n", flush=True)
  for k in [int(v) for v in args.ks.split(",")]:
    for layout in args.layouts.split(","):
      x, h, sizes = grouped_values(kernels, layout, args.group_size)
      inputs = x.nbytes + h.nbytes
      rng = np.random.default_rng(0)
      sample = 3 if layout == "layer" else args.sklearn_groups  # a whole layer takes seconds
      picks = np.sort(rng.choice(sizes.size, min(sample, sizes.size), replace=False))
      res = {}
      for method in ("gkq", "flash"):
        out = os.path.join(tmp, f"{method}_{layout}_{k}.npy")
        res[method] = run_child(script, kernels, layout, k, method, args.group_size,
                                args.repeats, out)
      sk_time, sk_sse = sklearn_sample(x, h, sizes, k, picks)
      if layout == "layer":
        layer_warm[k] = res["gkq"][0]["warm"]
      flash_warm, flash_sse = res["flash"][0]["warm"], res["flash"][1]
      for name, (t, sse) in (("gkq_jax", res["gkq"]), ("flash1dkmeans per group", res["flash"])):
        peak = t["peak"]
        rows.append((layout, sizes.size, k, name, f"{t['warm']:.2f}", f"{t['first']:.2f}",
                     f"{peak / 2**20 + inputs / 2**20:.0f}" if peak is not None else "-",
                     f"{(peak + inputs) / inputs:.2f}" if peak is not None else "-",
                     f"{sse.sum():.6g}", f"{sse.sum() / flash_sse.sum():.4f}",
                     f"{sse[picks].sum():.6g}", f"{flash_warm / t['warm']:.1f}",
                     f"{t['warm'] / layer_warm[k]:.2f}" if name == "gkq_jax" else "-"))
      rows.append((layout, sizes.size, k, f"sklearn KMeans ({picks.size} groups)",
                   f"~{sk_time:.1f}", "-", "-", "-", "-", "-", f"{sk_sse.sum():.6g}",
                   f"{flash_warm / sk_time:.2f}", "-"))
      print(f"done {layout} K={k}", flush=True)
  header = ("groups", "G", "K", "method", "warm s", "first s", "peak MB", "x inputs",
            "weighted SSE", "SSE / flash", "sample SSE", "x faster than flash",
            "time / per-layer gkq")
  print("\n| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    print("| " + " | ".join(str(v) for v in r) + " |")
  if args.json:
    import _summary
    _summary.write(args.json, header, rows)


if __name__ == "__main__":
  main()
