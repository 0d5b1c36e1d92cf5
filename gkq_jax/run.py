"""The command-line job: data, model, baseline, then the mode's stages.

``main.py`` parses flags and calls :func:`run`; everything here takes a config
and a workdir, so tests drive the same code on tiny data.

Modes: ``train`` (baseline only), ``compress`` (the full pipeline, default),
``sensitivity`` (one layer at a time at several bit widths), ``compare``
(quantization methods side by side at equal bits, before and after
fine-tuning).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import gkq_jax as gkq
from gkq_jax import compress as compress_lib
from gkq_jax import data as data_lib
from gkq_jax import encode as encode_lib
from gkq_jax import models
from gkq_jax import report as report_lib
from gkq_jax import rules as rules_lib
from gkq_jax import train as train_lib

MODELS = ("mlp", "lenet5", "resnet34", "resnet_tiny")
MODES = ("train", "compress", "sensitivity", "compare")


def create_model(config, num_classes: int):
  if config.model == "mlp":
    return models.MLP(tuple(config.mlp.hidden), num_classes, config.mlp.norm_every,
                      config.mlp.dropout)
  if config.model == "lenet5":
    return models.LeNet5(num_classes)
  if config.model in ("resnet34", "resnet_tiny"):
    name = config.resnet.get("dtype", "float32")
    if name not in ("float32", "bfloat16"):
      raise ValueError(f"config.resnet.dtype={name!r}: use 'float32' or 'bfloat16' "
                       "(mixed precision: bf16 compute, fp32 parameters).")
    dtype = jnp.dtype(name)
    if config.model == "resnet34":
      return models.ResNet34(num_classes, config.resnet.stem, config.resnet.width, dtype)
    return models.ResNetTiny(num_classes, config.resnet.stem, dtype)
  raise ValueError(f"config.model={config.model!r} is not one of {MODELS}.")


def prepare_workdir(workdir) -> pathlib.Path:
  path = pathlib.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".write_test"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"workdir {path} cannot be written ({e.strerror}); pass "
                     "--workdir=<a folder you can write>.") from None
  return path


def restore_init_checkpoint(path: str, state: train_lib.TrainState) -> train_lib.TrainState:
  """Weights (and batch statistics) from another run's checkpoint folder."""
  folder = pathlib.Path(path).resolve()
  if not folder.exists():
    raise ValueError(f"init_checkpoint {folder} does not exist.")
  with ocp.CheckpointManager(folder) as manager:
    step = manager.latest_step()
    if step is None:
      raise ValueError(f"init_checkpoint {folder} holds no checkpoint; point it at a folder "
                       "such as runs/<name>/checkpoints/baseline.")
    raw = manager.restore(step, args=ocp.args.StandardRestore())
  restored = {"params": raw.get("params"), "batch_stats": raw.get("batch_stats")}
  expected = {"params": state.params, "batch_stats": state.batch_stats}
  shapes = lambda t: jax.tree.map(lambda x: tuple(np.shape(x)), t)
  try:
    same = shapes(restored) == shapes(expected)
  except Exception:  # noqa: BLE001 - different structures
    same = False
  if not same:
    raise ValueError(f"init_checkpoint {folder} is of another model (its parameter tree or "
                     "shapes differ from this config's model); use the config that wrote it.")
  return state.replace(params=jax.tree.map(np.asarray, restored["params"]),
                       batch_stats=jax.tree.map(np.asarray, restored["batch_stats"]))


def run(config, workdir) -> dict:
  """Runs the configured mode; returns its results dict (also in results.json)."""
  if config.mode not in MODES:
    raise ValueError(f"config.mode={config.mode!r} is not one of {MODES}.")
  if config.get("distributed", False):
    jax.distributed.initialize()
  workdir = prepare_workdir(workdir)
  ds = data_lib.load(config.dataset, config.get("image_size"))
  logging.info("data %s: %d train / %d test images of shape %s, %d classes", ds.name,
               len(ds.train_x), len(ds.test_x), ds.train_x.shape[1:], ds.num_classes)
  model = create_model(config, ds.num_classes)
  ctx = compress_lib.Context(config, ds, train_lib.Mesh1D(), train_lib.MetricWriter(workdir),
                             workdir)
  tx = train_lib.create_optimizer(config, ctx.steps_per_epoch, config.num_epochs)
  state = train_lib.init_state(model, ds.train_x, tx, config.seed)
  if config.init_checkpoint:
    state = restore_init_checkpoint(config.init_checkpoint, state)
  else:
    state = train_lib.fit(state, ds, config, num_epochs=config.num_epochs, workdir=workdir,
                          stage="baseline", mesh=ctx.mesh, writer=ctx.writer)
  baseline = train_lib.evaluate(state, ds, config.eval_batch_size, ctx.mesh)
  results = {"parameters": int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
             "baseline_test_loss": baseline["test_loss"],
             "accuracy": {"baseline": baseline["test_accuracy"]}}
  if config.mode == "compress":
    results = compress(ctx, state, results)
  elif config.mode == "sensitivity":
    results = sensitivity(ctx, state, results)
  elif config.mode == "compare":
    results = compare(ctx, state, results)
  if jax.process_index() == 0:
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
  logging.info("results: %s", json.dumps(results))
  return results


def compress(ctx, state, results) -> dict:
  config, workdir = ctx.config, ctx.workdir
  rules = compress_lib.cluster_rules(config)
  compress_lib.check_rules_match(state.params, rules)
  acc = results["accuracy"]
  teacher = {"params": state.params, "batch_stats": state.batch_stats}
  masks = None
  if config.prune.enabled:
    state, masks = compress_lib.prune_stage(ctx, state, rules, teacher)
    acc["pruned"] = ctx.evaluate(state)
  before_clustering = state.params
  q = compress_lib.quantize_params(ctx, state, rules, masks)
  acc["quantized"] = ctx.evaluate(state, gkq.dequantize(q))
  state, q = compress_lib.finetune_stage(ctx, state, q, masks, teacher)
  acc["finetuned"] = ctx.evaluate(state)

  tree = {"params": q}
  if state.batch_stats is not None:
    tree["batch_stats"] = state.batch_stats
  path = workdir / "model.gkq"
  nbytes, sizes = encode_lib.save(path, tree)
  loaded = encode_lib.load(path)
  file_params = gkq.dequantize(loaded["params"])
  file_state = state.replace(batch_stats=loaded.get("batch_stats"))
  x = ctx.ds.test_x[:config.eval_batch_size]
  in_memory, _ = train_lib.apply_model(state, gkq.dequantize(q), x, False)
  from_file, _ = train_lib.apply_model(file_state, file_params, x, False)
  if not np.array_equal(np.asarray(in_memory), np.asarray(from_file)):
    raise RuntimeError(f"{path}: logits of the decoded file differ from the in-memory model.")
  acc["compressed_file"] = ctx.evaluate(file_state, file_params)

  fp32 = report_lib.fp32_bytes(teacher if state.batch_stats is not None else teacher["params"])
  results.update(fp32_bytes=fp32, compressed_bytes=nbytes, compression_ratio=fp32 / nbytes,
                 compressed_file=str(path))
  rows = report_lib.layer_rows({"params": q}, sizes)
  text = report_lib.write(workdir, results, rows)
  results["plots"] = report_lib.plot(workdir, {"params": before_clustering}, {"params": q},
                                     results)
  print(text)
  return results


def sensitivity(ctx, state, results) -> dict:
  """Quantize one layer at a time (the rest stays fp32) at each bit width."""
  rules = compress_lib.cluster_rules(ctx.config)
  selected = compress_lib.selected_leaves(state.params, rules)
  paths = [rules_lib.path_string(p) for p, use in
           jax.tree_util.tree_flatten_with_path(selected)[0] if use]
  imp = compress_lib.importance_of(ctx, state, ctx.config.quantize.importance)
  rows = []
  for path in paths:
    for bits in ctx.config.sensitivity.bits:
      rule = [rules_lib.bits_rule("^" + re.escape(path) + "$", int(bits))]
      q = gkq.quantize(state.params, imp, rule, method=ctx.config.quantize.method,
                       init=ctx.config.quantize.init)
      rows.append({"layer": path, "bits": int(bits),
                   "clusters": 2 ** int(bits),
                   "test_accuracy": ctx.evaluate(state, gkq.dequantize(q))})
      logging.info("sensitivity %s at %d bits: %.4f", path, bits, rows[-1]["test_accuracy"])
  with (ctx.workdir / "sensitivity.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  _plot_sensitivity(ctx.workdir, rows, results["accuracy"]["baseline"])
  results["sensitivity"] = rows
  return results


def _plot_sensitivity(workdir, rows, baseline):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4))
  for path in dict.fromkeys(r["layer"] for r in rows):
    mine = [r for r in rows if r["layer"] == path]
    ax.plot([r["bits"] for r in mine], [100 * r["test_accuracy"] for r in mine], marker="o",
            label=path)
  ax.axhline(100 * baseline, color="k", ls="--", lw=0.8, label="fp32")
  ax.set(xlabel="bits (2^bits shared values) for this layer only", ylabel="test accuracy (%)",
         title="layer sensitivity")
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(workdir / "sensitivity.png", dpi=120)
  plt.close(fig)


COMPARE_METHODS = {
    # name: (importance, method, init, max_iter)
    "uniform": ("none", "lloyd", "linear", 0),
    "kmeans": ("none", "hist", "dp", 300),
    "kmeans exact": ("none", "exact", "dp", 300),
    "gkq abs_grad": ("abs_grad", "hist", "dp", 300),
    "gkq grad_sq": ("grad_sq", "hist", "dp", 300),
    "gkq grad_sq exact": ("grad_sq", "exact", "dp", 300),
}


def compare(ctx, state, results) -> dict:
  """Accuracy of each quantization method at equal bits, before / after fine-tuning."""
  base_params = state.params
  # One importance per kind, shared by every bit width (all ones for "none").
  importances = {kind: compress_lib.importance_of(ctx, state, kind)
                 for kind in {m[0] for m in COMPARE_METHODS.values()}}
  rows = []
  for bits in ctx.config.compare.bits:
    rules = [rules_lib.bits_rule(r"(^|/)kernel$", int(bits))]
    for name, (importance, method, init, max_iter) in COMPARE_METHODS.items():
      q = gkq.quantize(base_params, importances[importance], rules, method=method, init=init, max_iter=max_iter,
                       key=jax.random.PRNGKey(ctx.config.seed))
      before = ctx.evaluate(state, gkq.dequantize(q))
      stage = f"compare_{name.replace(' ', '_')}_{bits}bit"
      tuned, _ = compress_lib.finetune_stage(ctx, state.replace(params=base_params), q, None,
                                             stage=stage,
                                             epochs=ctx.config.compare.finetune_epochs)
      after = ctx.evaluate(tuned)
      rows.append({"method": name, "bits": int(bits), "before_finetune": before,
                   "after_finetune": after})
      logging.info("compare %s %d bits: %.4f -> %.4f", name, bits, before, after)
  lines = ["| method | bits | accuracy before fine-tuning | after |", "|---|---|---|---|"]
  lines += [f"| {r['method']} | {r['bits']} | {100 * r['before_finetune']:.2f}% | "
            f"{100 * r['after_finetune']:.2f}% |" for r in rows]
  text = (f"baseline fp32: {100 * results['accuracy']['baseline']:.2f}%\n\n" + "\n".join(lines)
          + "\n")
  (ctx.workdir / "compare.md").write_text(text)
  print(text)
  results["compare"] = rows
  return results


def default_workdir(config_path: str) -> str:
  """runs/<config name>[-<variant>] for --config=configs/<name>.py[:<variant>]."""
  path, _, variant = config_path.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{name}-{variant}" if variant else name)
