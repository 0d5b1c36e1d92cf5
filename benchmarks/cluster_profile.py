"""Where the time of one grouped k-means call goes: the call timed with its parts
switched off one at a time, on cluster_groups.py's ResNet-34 kernels.

    python benchmarks/cluster_profile.py [--layout channel] [--k 16]

Each row is the best of --repeats warm calls of ``gkq.grouped_kmeans_1d`` with
the options shown; the differences between rows are the parts' shares:
``init="linear"`` replaces the DP start by an evenly spaced one, ``max_iter=0``
drops Lloyd on the histogram, ``refine_iters=0`` the Lloyd step on the values,
``exact_up_to=0`` the exact DP of small groups. The "passes only" row is
what is left with all of them off: the passes over the values any start needs
(ranges, histogram, assignment, the lossless check); flash1dkmeans' time
divided by it bounds the speed-up any start could give.

``--phases`` times the parts of the default call compiled one by one instead
(best of --repeats; the shares, not a sum that must equal the call): the
ranges, the histogram, the DP start's companded grid, its full DP on the
coarse grid alone and with the coarse-to-fine levels, one Lloyd step on the
values (its sums), the assignment.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = [("default", {}), ("refine_iters=0", dict(refine_iters=0)),
            ("max_iter=0", dict(max_iter=0)), ("init='linear'", dict(init="linear")),
            ("init='linear', max_iter=0, refine_iters=0",
             dict(init="linear", max_iter=0, refine_iters=0)),
            ("exact_up_to=0", dict(exact_up_to=0)),
            ("passes only: init='linear', max_iter=0, refine_iters=0, exact_up_to=0",
             dict(init="linear", max_iter=0, refine_iters=0, exact_up_to=0))]


def best_of(repeats, fn, *args):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def phases(x, h, sizes, k, repeats):
  """Best warm seconds of the default call's parts, each compiled alone."""
  from gkq_jax import _histogram as hist_lib
  from gkq_jax import _inits, _layout, _rows
  with jax.ensure_compile_time_eval():
    plan, arrays = _layout.make(sizes, k)
  ranges = jax.jit(lambda x, h: _rows.group_stats(plan, arrays, x, h))
  lo, hi, mass = ranges(x, h)
  frame = hist_lib.Frame((lo + hi) / 2, (hi - lo) / 2, mass <= 0)
  histogram = jax.jit(lambda x, h, frame: _rows.histogram(plan, arrays, frame, x, h))
  hist = histogram(x, h, frame)
  coarse, levels = _inits.dp_resolutions(k, plan.max_bins)
  final = coarse * 2 ** levels
  own_final = jnp.maximum(coarse, jnp.minimum(final, hist.bins))
  grid_fn = jax.jit(lambda hist: _inits._companded_grid(hist, own_final, final, "l2"))
  grid = grid_fn(hist)
  k_active = jnp.full((len(sizes),), k, jnp.int32)
  dp = lambda lv: jax.jit(lambda hist, grid: _inits.partition(hist, grid, k_active, k, coarse,
                                                               lv, own_final))
  c = jnp.sort(jax.random.uniform(jax.random.PRNGKey(0), (len(sizes), k), minval=-0.01,
                                  maxval=0.01), axis=1)
  sums = jax.jit(lambda x, h, c: _rows.cluster_sums(plan, arrays, frame, x, h, c))
  assign = jax.jit(lambda x, h, c: _rows.assign(plan, arrays, frame, x, h, c))
  return [("ranges (min, max, mass)", best_of(repeats, ranges, x, h)),
          ("histogram", best_of(repeats, histogram, x, h, frame)),
          ("DP start: companded grid", best_of(repeats, grid_fn, hist)),
          (f"DP start: full DP on {coarse} positions", best_of(repeats, dp(0), hist, grid)),
          (f"DP start: full DP + {levels} levels to {final}",
           best_of(repeats, dp(levels), hist, grid)),
          ("one Lloyd step on the values (sums)", best_of(repeats, sums, x, h, c)),
          ("assignment", best_of(repeats, assign, x, h, c))]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layout", default="channel", choices=("layer", "channel", "grouped"))
  parser.add_argument("--k", type=int, default=16)
  parser.add_argument("--group-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--phases", action="store_true",
                      help="time the default call's parts compiled one by one")
  args = parser.parse_args()

  import cluster_groups

  import gkq_jax as gkq

  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "kernels.npz")
    cluster_groups.save_kernels(path)
    x, h, sizes = cluster_groups.grouped_values(path, args.layout, args.group_size)
  xj, hj = jnp.asarray(x), jnp.asarray(h)
  sizes = tuple(int(s) for s in sizes)
  print(f"{args.layout}: {len(sizes)} groups, {x.size:,} values, K = {args.k}; "
        f"{os.cpu_count()} CPUs\n")
  if args.phases:
    print("| phase, compiled alone | best warm s |\n|---|---|")
    for name, seconds in phases(xj, hj, sizes, args.k, args.repeats):
      print(f"| {name} | {seconds:.3f} |", flush=True)
    return
  print("| options | best warm s |\n|---|---|")
  for name, options in VARIANTS:
    call = lambda options=options: gkq.grouped_kmeans_1d(xj, hj, sizes, args.k, **options)
    print(f"| {name} | {best_of(args.repeats, call):.3f} |", flush=True)


if __name__ == "__main__":
  main()
