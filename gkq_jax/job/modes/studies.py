"""Studies beside the pipeline: layer sensitivity and quantization methods compared.

``sensitivity``: one layer at a time at several bit widths, the rest fp32.
``compare``: uniform, plain k-means, gkq with |g| and g^2 weighting, and the
exact 1-D optimum at equal bits, before and after fine-tuning.
"""

from __future__ import annotations

import re

import jax
from absl import logging

import gkq_jax as gkq
from gkq_jax.job import context
from gkq_jax.job import report as report_lib
from gkq_jax.job.modes import compress as pipeline


def sensitivity(ctx: context.Context, state, results: dict) -> dict:
  """Quantize one layer at a time (the rest stays fp32) at each bit width."""
  config = ctx.config
  rules = context.cluster_rules(config)
  paths = [path for path, use in gkq.named_leaves(gkq.selected_leaves(state.params, rules))
           if use]
  imp = context.importance_of(ctx, state, config.quantize.importance)
  rows = []
  for path in paths:
    for bits in config.sensitivity.bits:
      rule = [gkq.bits_rule("^" + re.escape(path) + "$", int(bits))]
      q = gkq.quantize(state.params, imp, rule, method=config.quantize.method,
                       init=config.quantize.init)
      scores = {}
      ctx.score(scores, "q", state, gkq.dequantize(q))
      rows.append({"layer": path, "bits": int(bits), "clusters": 2 ** int(bits),
                   "test_accuracy": scores["accuracy"]["q"],
                   **({"validation_accuracy": scores["validation_accuracy"]["q"]}
                      if "validation_accuracy" in scores else {})})
      logging.info("sensitivity %s at %d bits: %.4f", path, bits, rows[-1]["test_accuracy"])
    context.release_compiled()  # one layer's programs at a time: keep the mappings few
  report_lib.write_sensitivity(ctx.workdir, rows, results["accuracy"]["baseline"])
  results["sensitivity"] = rows
  return results


COMPARE_METHODS = {
    # name: (importance, method, init, max_iter)
    "uniform": ("none", "lloyd", "linear", 0),
    "kmeans": ("none", "hist", "dp", 300),
    "kmeans exact": ("none", "exact", "dp", 300),
    "gkq abs_grad": ("abs_grad", "hist", "dp", 300),
    "gkq grad_sq": ("grad_sq", "hist", "dp", 300),
    "gkq grad_sq exact": ("grad_sq", "exact", "dp", 300),
}


def compare(ctx: context.Context, state, results: dict) -> dict:
  """Accuracy of each quantization method at equal bits, before / after fine-tuning."""
  config = ctx.config
  base_params = state.params
  # One importance per kind, shared by every bit width (all ones for "none").
  importances = {kind: context.importance_of(ctx, state, kind)
                 for kind in {m[0] for m in COMPARE_METHODS.values()}}
  rows = []
  for bits in config.compare.bits:
    rules = [gkq.bits_rule(r"(^|/)kernel$", int(bits))]
    for name, (importance, method, init, max_iter) in COMPARE_METHODS.items():
      q = gkq.quantize(base_params, importances[importance], rules, method=method, init=init,
                       max_iter=max_iter, key=jax.random.PRNGKey(config.seed))
      scores = {}
      before = ctx.score(scores, "before_finetune", state, gkq.dequantize(q))
      stage = f"compare_{name.replace(' ', '_')}_{bits}bit"
      tuned, _ = pipeline.finetune_stage(ctx, state.replace(params=base_params), q, None,
                                         stage=stage, epochs=config.compare.finetune_epochs)
      after = ctx.score(scores, "after_finetune", tuned)
      rows.append({"method": name, "bits": int(bits), "before_finetune": before,
                   "after_finetune": after,
                   **{f"validation_{k}": v for k, v in scores.get("validation_accuracy",
                                                                  {}).items()}})
      logging.info("compare %s %d bits: %.4f -> %.4f", name, bits, before, after)
      context.release_compiled()  # each method's programs are its own: keep the mappings few
  print(report_lib.write_compare(ctx.workdir, rows, results["accuracy"]["baseline"]))
  results["compare"] = rows
  return results
