"""Energy per example (gkq_jax/energy.py's model) of fp32, pruned and quantized models.

For each model: the fp32 weights (a trained checkpoint when given, else the
initialised ones), the same weights pruned one-shot by magnitude
(|w| < quality x std per kernel set to zero), and those pruned weights shared
at ``--bits`` bits per kernel (g-free k-means with the zero pinned) and written
to a real file, whose per-leaf bytes are what the quantized row reads from DRAM.
Energy depends only on shapes, zeros and stored bits, so untrained weights give
the same MAC counts and nearly the same storage as trained ones.

  python benchmarks/energy_table.py \\
      --checkpoint mlp=runs/mlp-fm/checkpoints/baseline \\
      --checkpoint lenet5=runs/lenet5-fm/checkpoints/baseline
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import gkq_jax as gkq  # noqa: E402
from configs import default  # noqa: E402
from gkq_jax.job import models  # noqa: E402
from gkq_jax.job import run as run_lib  # noqa: E402
from gkq_jax.job.training import train as train_lib  # noqa: E402

MODELS = {  # name: (config model, input shape of one example, label)
    "mlp": ("mlp", (28, 28, 1), "LeNet-300-100 (28x28)"),
    "lenet5": ("lenet5", (28, 28, 1), "LeNet-5 (28x28)"),
    "resnet34": ("resnet34", (32, 32, 3), "ResNet-34, CIFAR stem (32x32x3)"),
}


def variables_of(name: str, checkpoint: str | None):
  config = default.get_config()
  config.model = MODELS[name][0]
  model = models.create_model(config, 10)
  state = train_lib.init_state(model, MODELS[name][1], train_lib.create_optimizer(
      "sgd", 0.1, total_steps=1, warmup_steps=0, momentum=0.9, weight_decay=0.0), 0)
  if checkpoint:
    state = run_lib.restore_init_checkpoint(checkpoint, state)
  variables = {"params": state.params}
  if state.batch_stats is not None:
    variables["batch_stats"] = state.batch_stats
  return model, variables


def rows_for(name: str, checkpoint: str | None, quality: float, bits: int) -> list[dict]:
  model, variables = variables_of(name, checkpoint)
  apply = lambda v, x: model.apply(v, x, train=False)
  x = jnp.zeros((1,) + MODELS[name][1], jnp.float32)
  rules = [gkq.bits_rule(r"(^|/)kernel$", bits)]
  selected = gkq.selected_leaves(variables, rules)
  masks = jax.tree.map(np.asarray, gkq.magnitude_masks(variables, selected, quality))
  pruned = gkq.apply_masks(variables, masks)
  quantized = gkq.quantize(pruned, None, rules, masks=masks)
  with tempfile.TemporaryDirectory() as folder:
    nbytes, sizes = gkq.save(pathlib.Path(folder) / "model.gkq", quantized)
  kept = 1 - gkq.sparsity(pruned, selected)
  stages = [("fp32", variables, None), (f"pruned ({100 * kept:.1f}% of kernels kept)", pruned,
                                        None),
            (f"pruned + {bits}-bit shared ({nbytes:,} B file)", quantized,
             {k: v["bytes"] for k, v in sizes.items()})]
  out = []
  for stage, tree, stored in stages:
    e = gkq.estimate_energy(apply, tree, x, stored_bytes=stored)
    out.append({"model": MODELS[name][2], "stage": stage, "macs": e.macs,
                "weight_kib": e.weight_bits / 8 / 1024, "mac_uj": e.mac_uj,
                "dram_uj": e.weight_dram_uj, "sram_uj": e.codebook_sram_uj,
                "act_uj": e.activation_uj, "total_uj": e.total_uj,
                "xla_flops": e.xla_flops})
  for row in out:
    row["x_less"] = out[0]["total_uj"] / row["total_uj"]
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="mlp,lenet5,resnet34")
  parser.add_argument("--checkpoint", action="append", default=[],
                      help="name=folder of a baseline checkpoint "
                      "(e.g. runs/x/checkpoints/baseline)")
  parser.add_argument("--quality", type=float, default=1.0, help="prune |w| < quality x std")
  parser.add_argument("--bits", type=int, default=4)
  args = parser.parse_args()
  checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
  unknown = set(checkpoints) - set(MODELS)
  if unknown:
    parser.error(f"--checkpoint names {sorted(unknown)}; models are {sorted(MODELS)}")
  print("| model | weights | stage | MACs | weights read (KiB) | MAC uJ | DRAM uJ | "
        "look-up uJ | activation uJ | total uJ | x less |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    source = "trained" if name in checkpoints else "initialised"
    for r in rows_for(name, checkpoints.get(name), args.quality, args.bits):
      print(f"| {r['model']} | {source} | {r['stage']} | {r['macs']:,.0f} | "
            f"{r['weight_kib']:,.1f} | {r['mac_uj']:.3g} | {r['dram_uj']:.4g} | "
            f"{r['sram_uj']:.3g} | {r['act_uj']:.3g} | {r['total_uj']:.4g} | "
            f"{r['x_less']:.1f} |", flush=True)


if __name__ == "__main__":
  main()
