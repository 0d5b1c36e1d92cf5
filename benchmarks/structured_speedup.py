"""Forward latency of the survey's architectures, side by side: does a smaller model run faster?

    python benchmarks/structured_speedup.py [--repeats 50] [--batches 1 256]

For LeNet-5 (28x28x1) and LeNet-300-100: the model, the same model with half
of every layer's conv filters and Dense neurons removed (what the survey's
``prune_norm`` produces), its low-rank factorization at a 0.25 parameter
ratio (``lowrank``, the survey configs' layers) and the distillation student
of the survey configs; "Conv_0 kept" halves Conv_1 and Dense_0 only. The two
conv layers are also timed alone, unpruned and halved, because XLA's CPU
convolution does not get faster with fewer filters for every shape. Latency
depends on the shapes only, so the weights are random. Every forward is jitted
and warmed up, then each round times every architecture once, in turn
(``gkq_jax/job/measure.py``), and the table shows the median and the speed-up
over the unpruned model of the same batch size.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import gkq_jax as gkq  # noqa: E402
from gkq_jax.job import models  # noqa: E402
from gkq_jax.job.training import measure  # noqa: E402


def _lowrank(model, shape, pattern):
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1,) + shape))["params"]
  ranks = {}
  for path, leaf in gkq.named_leaves(params):
    layer, _, name = path.rpartition("/")
    if name == "kernel" and re.search(pattern, layer):
      ranks[layer] = gkq.rank_for_ratio(leaf.shape, 0.25)
  return model.clone(ranks=tuple(sorted(ranks.items())))


class _ConvAlone(nn.Module):
  """One of LeNet-5's 5x5 valid convs on its own; reads the first ``inputs`` channels, so
  the unpruned and the halved layer take the same input array."""

  filters: int
  inputs: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Conv(self.filters, (5, 5), padding="VALID")(x[..., :self.inputs])


def cases():
  lenet, mlp = models.LeNet5(), models.MLP(models.LENET_300_100)
  return {
      "LeNet-5": ((28, 28, 1), {
          "unpruned": lenet,
          "half filters and neurons": lenet.clone(conv_widths=(10, 25), hidden=250),
          "half of Conv_1 and Dense_0, Conv_0 kept": lenet.clone(conv_widths=(20, 25),
                                                                 hidden=250),
          "low-rank 0.25 (Conv_1, Dense_0)": _lowrank(lenet, (28, 28, 1), r"^(Conv_1|Dense_0)$"),
          "student (10, 25) x 250": lenet.clone(conv_widths=(10, 25), hidden=250)}),
      "LeNet-300-100": ((28, 28, 1), {
          "unpruned": mlp,
          "half neurons": mlp.clone(hidden=(150, 50)),
          "low-rank 0.25 (Dense_0, Dense_1)": _lowrank(mlp, (28, 28, 1), r"^Dense_[01]$"),
          "student (100, 50)": mlp.clone(hidden=(100, 50))}),
      "LeNet-5 Conv_0 alone": ((28, 28, 1), {
          "unpruned": _ConvAlone(20, 1), "half filters (10)": _ConvAlone(10, 1)}),
      "LeNet-5 Conv_1 alone": ((12, 12, 20), {
          "unpruned": _ConvAlone(50, 20),
          "half filters, half inputs (10 -> 25)": _ConvAlone(25, 10)}),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
  args = parser.parse_args()
  print("| model | architecture | MACs | "
        + " | ".join(f"b={b} ms | speed-up" for b in args.batches) + " |")
  print("|---|---|---|" + "---|---|" * len(args.batches))
  for model_name, (shape, archs) in cases().items():
    forwards, macs = {}, {}
    for name, model in archs.items():
      variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
      forwards[name] = (measure.forward(model), variables)
      macs[name] = measure.count_macs(model, variables, shape)
    times = measure.latencies(forwards, shape, args.batches, args.repeats)
    for name in archs:
      cells = " | ".join(f"{1e3 * times[name][b]:.3f} | "
                         f"{times['unpruned'][b] / times[name][b]:.2f}x" for b in args.batches)
      print(f"| {model_name} | {name} | {macs[name]:,} | {cells} |")


if __name__ == "__main__":
  main()
