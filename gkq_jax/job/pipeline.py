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

import dataclasses
import functools
import pathlib
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

import gkq_jax as gkq
from gkq_jax.job import dkm_stage
from gkq_jax.job import energy as energy_lib
from gkq_jax.job import qat_stage as qat_stage_lib
from gkq_jax.job import report as report_lib
from gkq_jax.job import train as train_lib


@dataclasses.dataclass
class Context:
  """What every stage needs: config, data, mesh, where to write."""

  config: Any
  data: Any  # job/data.py Dataset or a streaming source with the same interface
  mesh: train_lib.Mesh1D
  writer: train_lib.MetricWriter
  workdir: pathlib.Path

  @property
  def steps_per_epoch(self) -> int:
    return max(1, self.data.num_train // self.config.batch_size)

  def evaluate(self, state, params=None, split: str = "test") -> float:
    return train_lib.evaluate(state, self.data, self.config.eval_batch_size, self.mesh,
                              params, split)[f"{split}_accuracy"]

  def score(self, results: dict, stage: str, state, params=None) -> float:
    """Records the stage's test accuracy in ``results["accuracy"]`` and, with a
    validation split, its validation accuracy (the one to choose settings by)
    in ``results["validation_accuracy"]``; returns the test accuracy."""
    results.setdefault("accuracy", {})[stage] = self.evaluate(state, params)
    if getattr(self.data, "has_validation", False):
      results.setdefault("validation_accuracy", {})[stage] = self.evaluate(
          state, params, "validation")
    return results["accuracy"][stage]

  def optimizer(self, epochs: int, learning_rate: float) -> optax.GradientTransformation:
    c = self.config
    return train_lib.create_optimizer(
        c.optimizer, learning_rate, total_steps=self.steps_per_epoch * epochs,
        warmup_steps=int(c.warmup_epochs * self.steps_per_epoch), momentum=c.momentum,
        weight_decay=c.weight_decay)

  def train(self, state, epochs: int, stage: str, extra_loss=None, seed=None):
    """``epochs`` epochs of the config's training step from ``state`` as it is
    (batches in the order of ``seed``, default the config's)."""
    c = self.config
    step = train_lib.make_train_step(augment=c.augment, cutout=c.cutout,
                                     label_smoothing=c.label_smoothing, extra_loss=extra_loss)
    return train_lib.fit(state, self.data, step, num_epochs=epochs, batch_size=c.batch_size,
                         seed=c.seed if seed is None else seed,
                         checkpoint_dir=self.workdir / "checkpoints" / stage,
                         mesh=self.mesh, writer=self.writer,
                         eval_batch_size=c.eval_batch_size, log_every=c.log_every,
                         checkpoint_every=c.checkpoint_every, stage=stage)

  def retrain(self, state, tx, epochs: int, stage: str, extra_loss=None):
    """A fresh optimiser ``tx`` on the current weights, trained ``epochs`` epochs."""
    state = train_lib.TrainState.create(apply_fn=state.apply_fn, params=state.params, tx=tx,
                                        batch_stats=state.batch_stats)
    return self.train(state, epochs, stage, extra_loss)


def cluster_rules(config) -> list[gkq.ClusterRule]:
  """Rules from ``quantize.rules`` ("regex=bits" strings, or "regex=kK" for K
  clusters) then the default ``quantize.bits`` for every Dense/Conv kernel."""
  rules = []
  for text in config.quantize.rules:
    pattern, sep, bits = str(text).rpartition("=")
    bits = bits.strip()
    if sep and bits[:1] == "k" and bits[1:].isdigit():  # K clusters, not 2^bits
      rules.append(gkq.ClusterRule(pattern, int(bits[1:])))
      continue
    if not sep or not bits.isdigit():
      raise ValueError(f"quantize.rules entry {text!r} must look like 'regex=bits' or "
                       "'regex=kK', e.g. 'Dense_0/kernel$=6' or 'Conv_1/kernel$=k24'.")
    rules.append(gkq.bits_rule(pattern, int(bits)))
  rules.append(gkq.bits_rule(r"(^|/)kernel$", int(config.quantize.bits)))
  if config.quantize.cluster_biases:  # 1-D: below the kernels' min_ndim, so a rule of its own
    rules.append(gkq.ClusterRule(BIAS_PATTERN, 2 ** int(config.quantize.bits), min_ndim=1))
  return rules


def importance_of(ctx: Context, state, kind: str):
  """Importance of ``state.params`` from ``quantize.importance_batches`` batches."""

  def loss_fn(params, batch):
    logits, _ = train_lib.apply_model(state, params, batch[0], False)
    return train_lib.cross_entropy(logits, batch[1])

  batches = ctx.data.train_batches(ctx.config.batch_size, ctx.config.seed, 10_000)
  limited = (b for _, b in zip(range(ctx.config.quantize.importance_batches), batches))
  return gkq.compute_importance(loss_fn, state.params, limited, kind)


def distillation_loss(state, teacher, weight: float, temperature: float = 4.0):
  """Hinton et al.: KL(teacher || student) on softened logits, x T^2."""
  if weight <= 0:
    return None

  def extra(params, x, logits):
    teacher_state = state.replace(batch_stats=teacher["batch_stats"])
    teacher_logits, _ = train_lib.apply_model(teacher_state, teacher["params"], x, False)
    p = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / temperature)
    log_q = jax.nn.log_softmax(logits / temperature)
    return weight * temperature ** 2 * jnp.mean(jnp.sum(p * (jnp.log(p + 1e-12) - log_q), -1))

  return extra


# ----------------------------------------------------------------------- stages


PRUNE_METHODS = ("magnitude", "obd")
BIAS_PATTERN = r"(^|/)bias$"  # quantize.cluster_biases: quantized, never pruned
ALLOCATIONS = ("optimal", "same")


def check_config(config) -> None:
  """Pruning and budget settings, checked before any training."""
  p, q = config.prune, config.quantize
  if p.method not in PRUNE_METHODS:
    raise ValueError(f"prune.method={p.method!r} is not one of {PRUNE_METHODS}.")
  if p.method == "obd":
    if int(p.rounds) < 1:
      raise ValueError(f"prune.rounds must be >= 1, got {p.rounds}.")
    gkq.cubic_sparsity(1, p.sparsity, int(p.rounds))  # raises on a sparsity outside [0, 1)
    if p.scope not in gkq.prune.PRUNE_SCOPES:
      raise ValueError(f"prune.scope={p.scope!r} is not one of {gkq.prune.PRUNE_SCOPES}.")
  qat_stage_lib.check_config(config)
  gkq.damp_importance({}, q.damping)  # raises on a negative damping
  if q.budget_bytes < 0:
    raise ValueError(f"quantize.budget_bytes must be >= 0 (0: no budget), got {q.budget_bytes}.")
  bad = [m for m in q.budget_methods if m not in gkq.allocation.METHODS]
  if bad or not q.budget_methods:
    raise ValueError(f"quantize.budget_methods={tuple(q.budget_methods)} must be taken from "
                     f"{gkq.allocation.METHODS}.")
  if min(q.budget_clusters) < 2:
    raise ValueError(f"quantize.budget_clusters must all be >= 2, got {tuple(q.budget_clusters)}.")
  if q.allocation not in ALLOCATIONS:
    raise ValueError(f"quantize.allocation={q.allocation!r} is not one of {ALLOCATIONS}.")


def prune_amounts(cfg) -> list[float]:
  """Per round: the magnitude rule's quality, or for OBD the sparsity on Zhu &
  Gupta's cubic ramp (most of it early, while many weights are redundant)."""
  if cfg.method == "magnitude":
    return [float(q) for q in cfg.qualities]
  return [float(gkq.cubic_sparsity(r, cfg.sparsity, int(cfg.rounds)))
          for r in range(1, int(cfg.rounds) + 1)]


def prune_masks(ctx: Context, state, selected, amount: float):
  """Magnitude masks (quality x std), or OBD's: the fraction ``amount`` with
  the least saliency h w^2, h the quantizer's importance at the current weights."""
  cfg = ctx.config.prune
  if cfg.method == "magnitude":
    return gkq.magnitude_masks(state.params, selected, amount)
  importance = gkq.damp_importance(importance_of(ctx, state, ctx.config.quantize.importance),
                                   ctx.config.quantize.damping)
  return gkq.saliency_masks(state.params, importance, selected, amount, cfg.scope)


def prune_stage(ctx: Context, state, rules, teacher=None):
  """Iterative pruning with retraining; returns (state, masks)."""
  cfg = ctx.config.prune
  selected = gkq.selected_leaves(state.params, [r for r in rules if r.pattern != BIAS_PATTERN])
  extra = distillation_loss(state, teacher, cfg.distill) if teacher else None
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


def _file_bytes(state, quantized) -> tuple[int, int]:
  """(bytes of model.gkq holding ``quantized``, bytes of all but its clustered leaves)."""
  extra = {} if state.batch_stats is None else {"batch_stats": state.batch_stats}
  with tempfile.TemporaryDirectory() as folder:  # a measurement, not an output
    total, sizes = gkq.save(pathlib.Path(folder) / "trial.gkq", {"params": quantized, **extra})
  clustered = sum(sizes[p]["bytes"] for p, _ in gkq.clustered_leaves({"params": quantized}))
  return total, total - clustered


def budget_quantize(ctx: Context, state, rules, masks, importance, results=None):
  """Quantizes so that the whole ``model.gkq`` takes at most
  ``quantize.budget_bytes``: the clustered leaves get what the raw leaves,
  the header and the checksum leave (measured on trial files)."""
  q = ctx.config.quantize
  target = int(q.budget_bytes)
  file_bytes = functools.partial(_file_bytes, state)
  _, overhead = file_bytes(gkq.quantize(state.params, None, rules, masks=masks))
  leaf_budget = target - overhead
  for attempt in range(8):  # the header's size moves a little with the codings chosen
    result = gkq.quantize_to_budget(
        state.params, importance, rules, leaf_budget, methods=tuple(q.budget_methods),
        allocation=q.allocation, masks=masks, pin_zero=q.pin_zero,
        clusters=tuple(q.budget_clusters), points=int(q.budget_points),
        key=jax.random.PRNGKey(ctx.config.seed),
        method=q.method, init=q.init, objective=q.objective)
    total, _ = file_bytes(result.quantized)
    if total <= target:
      break
    # A growing margin: a new choice of codings can grow the compressed header
    # by about what it saved, so taking off only the excess may never converge.
    leaf_budget -= total - target + 2 ** attempt
  else:
    raise RuntimeError(f"quantize.budget_bytes={target}: the file stays at {total} bytes.")
  if results is not None:
    results["budget_bytes"] = target
    results["allocation"] = [choice._asdict() for choice in result.choices]
  for choice in result.choices:
    logging.info("budget: %s -> %s %.4g, %d values, %d bytes", choice.path, choice.method,
                 choice.setting, choice.num_clusters, choice.bytes)
  return result


class Quantized(NamedTuple):
  params: Any  # the params with ClusteredArray leaves
  importance: Any  # the h they were clustered with
  prices: dict  # {leaf path: ECSQ price per bit} of layers the budget gave an ECSQ setting


def quantize_stage(ctx: Context, state, rules, masks, results=None) -> Quantized:
  q = ctx.config.quantize
  imp = gkq.damp_importance(importance_of(ctx, state, q.importance), q.damping)
  if q.budget_bytes:
    result = budget_quantize(ctx, state, rules, masks, imp, results)
    # Choice paths are of the params tree, as the quantized leaves' own paths.
    prices = {c.path: c.setting for c in result.choices if c.method == "ecsq"}
    return Quantized(result.quantized, imp, prices)
  return Quantized(dkm_stage.quantize(state.params, imp, rules, q.granularity, masks=masks,
                                      key=jax.random.PRNGKey(ctx.config.seed), method=q.method,
                                      init=q.init, objective=q.objective,
                                      group_size=int(q.group_size) or None), imp, {})


def qat_stage(ctx: Context, state, rules, masks, quantized: Quantized, teacher, results):
  """The ``qat`` stage (job/qat_stage.py). With a byte budget the ECSQ prices
  follow the weights so that the file stays within it; where they cannot, the
  trained weights are quantized to the budget again."""
  extra = distillation_loss(state, teacher, ctx.config.qat.distill) if teacher else None
  budget = int(ctx.config.quantize.budget_bytes)
  keep_budget = None
  if budget:
    file_bytes = lambda q: _file_bytes(state, q)[0]
    keep_budget = lambda refit, params, q, prices: qat_stage_lib.fit_budget(
        refit, params, q, prices, file_bytes, budget)
  state, q, within = qat_stage_lib.run(ctx, state, quantized.params, quantized.importance,
                                       quantized.prices, masks, extra, keep_budget)
  if not within:
    logging.info("qat: no price keeps the re-assigned file within quantize.budget_bytes=%d; "
                 "quantizing to the budget again", budget)
    q = quantize_stage(ctx, state, rules, masks, results).params
  return state, q


def finetune_stage(ctx: Context, state, quantized, masks, teacher=None, stage="finetune",
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
  extra = distillation_loss(state, teacher, cfg.distill) if teacher else None
  state = ctx.retrain(state, tx, epochs, stage, extra)
  return state, gkq.refresh_codebooks(quantized, state.params)


def encode_stage(ctx: Context, state, quantized):
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


def compress(ctx: Context, state, results: dict) -> dict:
  """The whole pipeline from a trained ``state``; adds to and returns ``results``."""
  config = ctx.config
  rules = cluster_rules(config)
  gkq.check_rules(state.params, rules)
  dkm_stage.check_config(config)
  teacher = {"params": state.params, "batch_stats": state.batch_stats}
  masks = None
  if config.prune.enabled:
    state, masks = prune_stage(ctx, state, rules, teacher)
    ctx.score(results, "pruned", state)
  if config.dkm.enabled and config.dkm.epochs > 0:
    state = dkm_stage.run(ctx, state, rules, masks, importance_of)
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
