"""Where the time of one grouped k-means call goes: the call timed with its parts
switched off one at a time, on cluster_groups.py's ResNet-34 kernels.

    python benchmarks/cluster_profile.py [--layout channel] [--k 16]

Each row is the best of --repeats warm calls of ``gkq.grouped_kmeans_1d`` with
the options shown; the differences between rows are the parts' shares:
``init="linear"`` replaces the DP start by an evenly spaced one, ``max_iter=0``
drops Lloyd on the histogram, ``refine_iters=0`` the Lloyd step on the values,
``exact_up_to=0`` the exact DP of small groups. The last of the "linear" rows
is what is left: the passes over the values any start needs (ranges,
histogram, assignment).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = [("default", {}), ("refine_iters=0", dict(refine_iters=0)),
            ("max_iter=0", dict(max_iter=0)), ("init='linear'", dict(init="linear")),
            ("init='linear', max_iter=0, refine_iters=0",
             dict(init="linear", max_iter=0, refine_iters=0)),
            ("exact_up_to=0", dict(exact_up_to=0))]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layout", default="channel", choices=("layer", "channel", "grouped"))
  parser.add_argument("--k", type=int, default=16)
  parser.add_argument("--group-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()

  import cluster_groups
  import jax
  import jax.numpy as jnp

  import gkq_jax as gkq

  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "kernels.npz")
    cluster_groups.save_kernels(path)
    x, h, sizes = cluster_groups.grouped_values(path, args.layout, args.group_size)
  xj, hj = jnp.asarray(x), jnp.asarray(h)
  sizes = tuple(int(s) for s in sizes)
  print(f"{args.layout}: {len(sizes)} groups, {x.size:,} values, K = {args.k}; "
        f"{os.cpu_count()} CPUs\n\n| options | best warm s |\n|---|---|")
  for name, options in VARIANTS:
    call = lambda: jax.block_until_ready(gkq.grouped_kmeans_1d(xj, hj, sizes, args.k, **options))
    call()
    best = float("inf")
    for _ in range(args.repeats):
      start = time.perf_counter()
      call()
      best = min(best, time.perf_counter() - start)
    print(f"| {name} | {best:.3f} |", flush=True)


if __name__ == "__main__":
  main()
