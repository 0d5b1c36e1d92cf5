"""Train-step time with the centroid-sharing transform vs the plain optimiser.

    python benchmarks/finetune_overhead.py [--steps 20]

Same model, same batch, same optimiser (SGD + momentum); the only difference
is ``share_centroids`` at the end of the chain (4-bit codebooks on every
kernel). Steps are timed interleaved (plain, shared, plain, ...) after a
warm-up, and the table shows the median step time of each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import gkq_jax as gkq  # noqa: E402
from gkq_jax import models, share, train  # noqa: E402

CASES = {
    "LeNet-300-100": (lambda: models.MLP(models.LENET_300_100), (128, 28, 28, 1)),
    "ResNet-34 (CIFAR)": (lambda: models.ResNet34(10), (8, 32, 32, 3)),
}


def make_step(model, shape, shared: bool):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  y = jnp.arange(shape[0]) % 10
  variables = model.init(jax.random.PRNGKey(1), x[:1])
  params = variables["params"]
  tx = optax.sgd(0.01, momentum=0.9)
  if shared:
    q = gkq.quantize(params, None, [gkq.bits_rule(r"kernel$", 4)])
    params = gkq.dequantize(q)
    tx = optax.chain(tx, share.share_centroids(q))
  state = train.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                  batch_stats=variables.get("batch_stats"))
  step = jax.jit(train.train_step, donate_argnums=0)
  return step, state, (x, y)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  print(f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs\n")
  print("| model | plain step ms | shared-centroid step ms | ratio |")
  print("|---|---|---|---|")
  for name, (build, shape) in CASES.items():
    model = build()
    runs = {kind: list(make_step(model, shape, kind == "shared")) for kind in ("plain", "shared")}
    key = jax.random.PRNGKey(2)
    for kind, (step, state, batch) in runs.items():  # compile + warm up
      for _ in range(2):
        state, m = step(state, batch, key)
      jax.block_until_ready(m)
      runs[kind][1] = state
    times = {"plain": [], "shared": []}
    for _ in range(args.steps):
      for kind in ("plain", "shared"):
        step, state, batch = runs[kind]
        start = time.perf_counter()
        state, m = step(state, batch, key)
        jax.block_until_ready(m)
        times[kind].append(time.perf_counter() - start)
        runs[kind][1] = state
    plain, shared = (1e3 * float(np.median(times[k])) for k in ("plain", "shared"))
    print(f"| {name} | {plain:.2f} | {shared:.2f} | {shared / plain:.3f} |")


if __name__ == "__main__":
  main()
