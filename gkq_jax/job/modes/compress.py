"""The compression pipeline: prune -> importance -> quantize -> fine-tune -> encode.

:func:`compress` runs it all, down to the file, the check that the decoded
file gives the in-memory model's logits bit for bit, and the report. Every
stage starts from a state computed deterministically from the previous
stage's final state, and every training stage checkpoints each epoch, so a
rerun with the same workdir replays finished stages from their checkpoints and
resumes the one that was interrupted. Nothing a stage wrote is removed by a
later one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from absl import logging

import gkq_jax as gkq
from gkq_jax.job import context
from gkq_jax.job import report as report_lib
from gkq_jax.job.modes import budget as budget_lib
from gkq_jax.job.modes import dkm_stage
from gkq_jax.job.modes import qat_stage as qat_stage_lib
from gkq_jax.job.training import energy as energy_lib
from gkq_jax.job.training import train as train_lib

# ----------------------------------------------------------------------- stages


PRUNE_METHODS = ("magnitude", "obd")


def check_config(config) -> None:
  """Pruning and budget settings (run by ``run.check_config`` before any training)."""
  p, q = config.prune, config.quantize
  if p.method not in PRUNE_METHODS:
    raise ValueError(f"prune.method={p.method!r} is not one of {PRUNE_METHODS}.")
  if p.method == "obd":
    if int(p.rounds) < 1:
      raise ValueError(f"prune.rounds must be >= 1, got {p.rounds}.")
    gkq.cubic_sparsity(1, p.sparsity, int(p.rounds))  # raises on a sparsity outside [0, 1)
    if p.scope not in gkq.PRUNE_SCOPES:
      raise ValueError(f"prune.scope={p.scope!r} is not one of {gkq.PRUNE_SCOPES}.")
  gkq.damp_importance({}, q.damping)  # raises on a negative damping
  if q.budget_bytes < 0:
    raise ValueError(f"quantize.budget_bytes must be >= 0 (0: no budget), got {q.budget_bytes}.")
  bad = [m for m in q.budget_methods if m not in gkq.BUDGET_METHODS]
  if bad or not q.budget_methods:
    raise ValueError(f"quantize.budget_methods={tuple(q.budget_methods)} must be taken from "
                     f"{gkq.BUDGET_METHODS}.")
  if min(q.budget_clusters) < 2:
    raise ValueError(f"quantize.budget_clusters must all be >= 2, got {tuple(q.budget_clusters)}.")
  if q.allocation not in gkq.ALLOCATIONS:
    raise ValueError(f"quantize.allocation={q.allocation!r} is not one of {gkq.ALLOCATIONS}.")


def prune_amounts(cfg) -> list[float]:
  """Per round: the magnitude rule's quality, or for OBD the sparsity on Zhu &
  Gupta's cubic ramp (most of it early, while many weights are redundant)."""
  if cfg.method == "magnitude":
    return [float(q) for q in cfg.qualities]
  return [float(gkq.cubic_sparsity(r, cfg.sparsity, int(cfg.rounds)))
          for r in range(1, int(cfg.rounds) + 1)]


def prune_masks(ctx: context.Context, state, selected, amount: float):
  """Magnitude masks (quality x std), or OBD's: the fraction ``amount`` with
  the least saliency h w^2, h the quantizer's importance at the current weights."""
  cfg = ctx.config.prune
  if cfg.method == "magnitude":
    return gkq.magnitude_masks(state.params, selected, amount)
  kind = ctx.config.quantize.importance
  importance = gkq.damp_importance(context.importance_of(ctx, state, kind),
                                   ctx.config.quantize.damping)
  return gkq.saliency_masks(state.params, importance, selected, amount, cfg.scope)


def prune_stage(ctx: context.Context, state, rules, teacher=None):
  """Iterative pruning with retraining; returns (state, masks)."""
  cfg = ctx.config.prune
  prunable = [r for r in rules if r.pattern != context.BIAS_PATTERN]
  selected = gkq.selected_leaves(state.params, prunable)
  extra = context.distillation_loss(state, teacher, cfg.distill) if teacher else None
  masks = None
  for i, amount in enumerate(prune_amounts(cfg)):
    # Host copies: the optimiser state that holds them is donated every step.
    masks = jax.tree.map(np.asarray, prune_masks(ctx, state, selected, amount))
    state = state.replace(params=gkq.apply_masks(state.params, masks))
    tx = gkq.keep_pruned(ctx.optimizer(cfg.epochs_per_round, cfg.learning_rate), masks)
    state = ctx.retrain(state, tx, cfg.epochs_per_round, f"prune_{i + 1}", extra)
    logging.info("prune round %d (%s %.3f): %.1f%% of selected weights kept", i + 1,
                 "quality" if cfg.method == "magnitude" else "sparsity", amount,
                 100 * (1 - gkq.sparsity(state.params, selected)))
  return state, masks


class Quantized(NamedTuple):
  params: Any  # the params with ClusteredArray leaves
  importance: Any  # the h they were clustered with
  prices: dict  # {leaf path: ECSQ price per bit} of layers the budget gave an ECSQ setting


def quantize_stage(ctx: context.Context, state, rules, masks, results=None) -> Quantized:
  q = ctx.config.quantize
  imp = gkq.damp_importance(context.importance_of(ctx, state, q.importance), q.damping)
  if q.budget_bytes:
    result = budget_lib.budget_quantize(ctx, state, rules, masks, imp, results)
    # Choice paths are of the params tree, as the quantized leaves' own paths.
    prices = {c.path: c.setting for c in result.choices if c.method == "ecsq"}
    return Quantized(result.quantized, imp, prices)
  return Quantized(dkm_stage.quantize(state.params, imp, rules, q.granularity, masks=masks,
                                      key=jax.random.PRNGKey(ctx.config.seed), method=q.method,
                                      init=q.init, objective=q.objective,
                                      group_size=int(q.group_size) or None), imp, {})


def qat_stage(ctx: context.Context, state, rules, masks, quantized: Quantized, teacher, results):
  """The ``qat`` stage (job/modes/qat_stage.py). With a byte budget the ECSQ
  prices follow the weights so that the file stays within it; where they
  cannot, the trained weights are quantized to the budget again."""
  state, q, within = qat_stage_lib.run(ctx, state, quantized.params, quantized.importance,
                                       quantized.prices, masks, teacher)
  if not within:
    logging.info("qat: no price keeps the re-assigned file within quantize.budget_bytes=%d; "
                 "quantizing to the budget again", int(ctx.config.quantize.budget_bytes))
    q = quantize_stage(ctx, state, rules, masks, results).params
  return state, q


def finetune_stage(ctx: context.Context, state, quantized, masks, teacher=None, stage="finetune",
                   epochs=None):
  """Fine-tunes on the shared values; returns (state, quantized with new codebooks)."""
  cfg = ctx.config.finetune
  epochs = cfg.epochs if epochs is None else epochs
  state = state.replace(params=gkq.dequantize(quantized))
  if epochs <= 0:
    return state, quantized
  inner = ctx.optimizer(epochs, cfg.learning_rate)
  if masks is not None:
    inner = gkq.keep_pruned(inner, masks)
  tx = optax.chain(inner, gkq.share_centroids(quantized, cfg.reduce))
  extra = context.distillation_loss(state, teacher, cfg.distill) if teacher else None
  state = ctx.retrain(state, tx, epochs, stage, extra)
  return state, gkq.refresh_codebooks(quantized, state.params)


def encode_stage(ctx: context.Context, state, quantized):
  """Writes ``model.gkq`` and checks that the decoded file gives the in-memory
  model's logits bit for bit; returns (path, bytes, per-leaf sizes, decoded state)."""
  tree = {"params": quantized}
  if state.batch_stats is not None:
    tree["batch_stats"] = state.batch_stats
  path = ctx.workdir / "model.gkq"
  nbytes, sizes = gkq.save(path, tree)
  loaded = gkq.load(path)
  file_state = state.replace(params=gkq.dequantize(loaded["params"]),
                             batch_stats=loaded.get("batch_stats"))
  x = next(iter(ctx.data.test_batches(ctx.config.eval_batch_size)))[0]
  in_memory, _ = train_lib.apply_model(state, gkq.dequantize(quantized), x, False)
  from_file, _ = train_lib.apply_model(file_state, file_state.params, x, False)
  if not np.array_equal(np.asarray(in_memory), np.asarray(from_file)):
    raise RuntimeError(f"{path}: logits of the decoded file differ from the in-memory model.")
  return path, nbytes, sizes, file_state


def compress(ctx: context.Context, state, results: dict) -> dict:
  """The whole pipeline from a trained ``state``; adds to and returns ``results``."""
  config = ctx.config
  rules = context.cluster_rules(config)
  gkq.check_rules(state.params, rules)
  teacher = {"params": state.params, "batch_stats": state.batch_stats}
  masks = None
  if config.prune.enabled:
    state, masks = prune_stage(ctx, state, rules, teacher)
    ctx.score(results, "pruned", state)
  if config.dkm.enabled and config.dkm.epochs > 0:
    state = dkm_stage.run(ctx, state, rules, masks)
    ctx.score(results, "dkm", state)
  before_clustering = state.params
  quantized = quantize_stage(ctx, state, rules, masks, results)
  q = quantized.params
  ctx.score(results, "quantized", state, gkq.dequantize(q))
  if config.qat.enabled and config.qat.epochs > 0:
    state, q = qat_stage(ctx, state, rules, masks, quantized, teacher, results)
    ctx.score(results, "qat", state, gkq.dequantize(q))
  state, q = finetune_stage(ctx, state, q, masks, teacher)
  ctx.score(results, "finetuned", state)
  path, nbytes, sizes, file_state = encode_stage(ctx, state, q)
  ctx.score(results, "compressed_file", file_state)

  fp32 = report_lib.fp32_bytes(teacher if state.batch_stats is not None else teacher["params"])
  results.update(fp32_bytes=fp32, compressed_bytes=nbytes, compression_ratio=fp32 / nbytes,
                 compressed_file=str(path))
  sample = next(iter(ctx.data.test_batches(ctx.config.eval_batch_size)))[0]
  results["energy"] = energy_lib.compression_energy(
      state, sample, teacher, before_clustering if masks is not None else None,
      energy_lib.variables_of(state, q), sizes)
  results.update(dkm_stage.deep_kmeans_accounting(q))
  text, results["plots"] = report_lib.write_compression(
      ctx.workdir, results, {"params": before_clustering}, {"params": q}, sizes)
  print(text)
  return results
