"""Quantization methods at equal file bytes (mode ``equal_bytes``).

For each ``equal_bytes.bits`` b the budget is what b-bit fixed-width
codebooks take in the file (b bits per weight + a 2^b-entry float32
codebook per layer). Every method gets that many bytes for the selected
kernels, Huffman / sparse coding included, and is scored before and after
``equal_bytes.finetune_epochs`` of fine-tuning on the shared values:

  * ``kmeans``: plain k-means, one K for every layer (the largest that fits);
  * ``gkq grad_sq``: the same with g^2-weighted k-means;
  * ``ecsq grad_sq``: entropy-constrained clustering, one price per bit for
    every layer, found by bisection; then the same with the importance damped
    by ``quantize.damping`` (:func:`gkq_jax.damp_importance`);
  * ``uniform + huffman``: uniform cells of one width (bisection), cell means;
  * ``optimal allocation``: each layer its own k-means K or ECSQ price,
    chosen by :func:`gkq_jax.allocate` for the least (damped) g^2-weighted
    distortion.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging

import gkq_jax as gkq
from gkq_jax.job import context
from gkq_jax.job import report as report_lib
from gkq_jax.job.modes import compress as pipeline

METHODS = {
    # name: (importance kind, damped, candidate families, allocation)
    "kmeans": ("none", False, ("kmeans",), "same"),
    "gkq grad_sq": ("grad_sq", False, ("kmeans",), "same"),
    "ecsq grad_sq": ("grad_sq", False, ("ecsq",), "same"),
    "ecsq grad_sq damped": ("grad_sq", True, ("ecsq",), "same"),
    "uniform + huffman": ("none", False, ("uniform",), "same"),
    "optimal allocation damped": ("grad_sq", True, ("kmeans", "ecsq"), "optimal"),
}


def fixed_width_bytes(params, rules, bits: int) -> int:
  """Bytes of the selected leaves at ``bits``-bit fixed-width indices plus a
  2^bits float32 codebook each: the budget every method gets."""
  sizes = dict((path, int(np.size(leaf))) for path, leaf in gkq.named_leaves(params))
  return sum(-(-sizes[path] * bits // 8) + 4 * 2 ** bits
             for path, use in gkq.named_leaves(gkq.selected_leaves(params, rules)) if use)


def grad_sq_distortion(params, quantized, importance) -> float:
  """sum g^2 (w - q)^2 over the clustered leaves: one yardstick for every method."""
  dense, imp = dict(gkq.named_leaves(params)), dict(gkq.named_leaves(importance))
  return float(sum(np.sum(np.asarray(imp[path], np.float64) * (
      np.asarray(dense[path], np.float64) - np.asarray(leaf.dequantize(), np.float64)) ** 2)
                   for path, leaf in gkq.clustered_leaves(quantized)))


def check_config(config) -> None:
  """(run by ``run.check_config`` before any training)"""
  unknown = [m for m in config.equal_bytes.methods if m not in METHODS]
  if unknown:
    raise ValueError(f"equal_bytes.methods {unknown} are not among {tuple(METHODS)}.")


def equal_bytes(ctx: context.Context, state, results: dict) -> dict:
  config = ctx.config
  rules = context.cluster_rules(config)
  base = state.params
  importances = {kind: context.importance_of(ctx, state, kind)
                 for kind in {METHODS[m][0] for m in config.equal_bytes.methods} | {"grad_sq"}}
  damped_grad_sq = gkq.damp_importance(importances["grad_sq"], config.quantize.damping)
  rows = []
  for bits in config.equal_bytes.bits:
    budget = fixed_width_bytes(base, rules, int(bits))
    for name in config.equal_bytes.methods:
      kind, damped, families, allocation = METHODS[name]
      imp = None if kind == "none" else importances[kind]
      if damped:
        imp = gkq.damp_importance(imp, config.quantize.damping)
        name = f"{name} {config.quantize.damping:g}"
      out = gkq.quantize_to_budget(base, imp, rules, budget, methods=families,
                                   allocation=allocation, pin_zero=config.quantize.pin_zero,
                                   clusters=tuple(config.quantize.budget_clusters),
                                   points=int(config.quantize.budget_points),
                                   key=jax.random.PRNGKey(config.seed))
      scores = {}
      before = ctx.score(scores, "before_finetune", state, gkq.dequantize(out.quantized))
      stage = f"equal_bytes_{name.replace(' ', '_').replace('+', 'and')}_{bits}bit"
      tuned, _ = pipeline.finetune_stage(ctx, state.replace(params=base), out.quantized, None,
                                         stage=stage, epochs=config.equal_bytes.finetune_epochs)
      after = ctx.score(scores, "after_finetune", tuned)
      rows.append({
          "method": name, "bits": int(bits), "budget_bytes": budget,
          "bytes": int(sum(c.bytes for c in out.choices)),
          "distortion": grad_sq_distortion(base, out.quantized, importances["grad_sq"]),
          "damped_distortion": grad_sq_distortion(base, out.quantized, damped_grad_sq),
          "settings": [f"{c.method} {c.setting:.4g} ({c.num_clusters})" for c in out.choices],
          "before_finetune": before, "after_finetune": after,
          **{f"validation_{k}": v for k, v in scores.get("validation_accuracy", {}).items()}})
      logging.info("equal bytes %s at %d bits: %d bytes, %.4f -> %.4f", name, bits,
                   rows[-1]["bytes"], before, after)
      context.release_compiled()  # each method's programs are its own: keep the mappings few
  print(report_lib.write_equal_bytes(ctx.workdir, rows, results))
  results["equal_bytes"] = rows
  return results
