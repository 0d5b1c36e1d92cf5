"""Train-step time with the centroid-sharing transform vs the plain optimiser.

    python benchmarks/finetune_overhead.py [--steps 20] [--codebooks]

Same model, same batch, same optimiser (SGD + momentum); the only difference
is ``share_centroids`` at the end of the chain (4-bit codebooks on every
kernel). Steps are timed interleaved (plain, shared, plain, ...) after a
warm-up, and the table shows the median step time of each and their ratio.

``--codebooks`` adds the alternative the library does not ship: train the
codebooks themselves, the model reading its kernels through a gather
(``codebook[indices]``), so autodiff sums member gradients with a scatter and
the optimiser touches K values per layer instead of every weight. It is
measured for LeNet-300-100 only (the indices are baked into the step as
constants, too big for ResNet-34).
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
from gkq_jax import share  # noqa: E402
from gkq_jax.job import models  # noqa: E402
from gkq_jax.job.training import train  # noqa: E402

CASES = {
    "LeNet-300-100": (lambda: models.MLP(models.LENET_300_100), (128, 28, 28, 1)),
    "ResNet-34 (CIFAR)": (lambda: models.ResNet34(10), (8, 32, 32, 3)),
}


def codebook_apply(model, q):
  """An apply_fn whose "params" are the codebooks of ``q`` (and its plain leaves)."""
  indices = jax.tree.map(lambda l: l.indices if gkq.is_clustered(l) else None, q,
                         is_leaf=gkq.is_clustered)

  def apply_fn(variables, x, **kwargs):
    dense = jax.tree.map(lambda c, i: c if i is None else c[0][i], variables["params"],
                         indices, is_leaf=lambda t: t is None)
    return model.apply({**variables, "params": dense}, x, **kwargs)

  return apply_fn


def make_step(model, shape, kind: str):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  y = jnp.arange(shape[0]) % 10
  variables = model.init(jax.random.PRNGKey(1), x[:1])
  params = variables["params"]
  tx = optax.sgd(0.01, momentum=0.9)
  apply_fn = model.apply
  if kind != "plain":
    q = gkq.quantize(params, None, [gkq.bits_rule(r"kernel$", 4)])
    params = gkq.dequantize(q)
    tx = optax.chain(tx, share.share_centroids(q))
  if kind == "codebooks":
    apply_fn = codebook_apply(model, q)
    params = jax.tree.map(lambda l: l.codebook if gkq.is_clustered(l) else l, q,
                          is_leaf=gkq.is_clustered)
    tx = optax.sgd(0.01, momentum=0.9)
  state = train.TrainState.create(apply_fn=apply_fn, params=params, tx=tx,
                                  batch_stats=variables.get("batch_stats"))
  step = jax.jit(train.train_step, donate_argnums=0)
  return step, state, (x, y)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--codebooks", action="store_true",
                      help="also time training the codebooks directly (LeNet-300-100)")
  args = parser.parse_args()
  print(f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs\n")
  header = "| model | plain step ms | shared-centroid step ms | ratio |"
  rule = "|---|---|---|---|"
  if args.codebooks:
    header += " trainable-codebook step ms | ratio |"
    rule += "---|---|"
  print(header)
  print(rule)
  for name, (build, shape) in CASES.items():
    model = build()
    kinds = ["plain", "shared"]
    if args.codebooks and name.startswith("LeNet"):
      kinds.append("codebooks")
    runs = {kind: list(make_step(model, shape, kind)) for kind in kinds}
    key = jax.random.PRNGKey(2)
    for kind, (step, state, batch) in runs.items():  # compile + warm up
      for _ in range(2):
        state, m = step(state, batch, key)
      jax.block_until_ready(m)
      runs[kind][1] = state
    times = {kind: [] for kind in kinds}
    for _ in range(args.steps):
      for kind in kinds:
        step, state, batch = runs[kind]
        start = time.perf_counter()
        state, m = step(state, batch, key)
        jax.block_until_ready(m)
        times[kind].append(time.perf_counter() - start)
        runs[kind][1] = state
    ms = {kind: 1e3 * float(np.median(times[kind])) for kind in kinds}
    row = f"| {name} | {ms['plain']:.2f} | {ms['shared']:.2f} | {ms['shared'] / ms['plain']:.3f} |"
    if args.codebooks:
      row += (f" {ms['codebooks']:.2f} | {ms['codebooks'] / ms['plain']:.3f} |"
              if "codebooks" in ms else " - | - |")
    print(row)


if __name__ == "__main__":
  main()
