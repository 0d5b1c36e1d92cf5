"""What every mode trains and measures with: the :class:`Context` (config, data,
mesh, metric writer, workdir) and the pieces every mode shares: the clustering
rules of a config, importance on the training data, distillation from a teacher.

Modes and stages take a Context and call these directly; nothing here knows
about any mode.
"""

from __future__ import annotations

import dataclasses
import gc
import pathlib
from typing import Any

import jax
import optax

import gkq_jax as gkq
from gkq_jax.job import report as report_lib
from gkq_jax.job.training import train as train_lib

BIAS_PATTERN = r"(^|/)bias$"  # quantize.cluster_biases: quantized, never pruned


@dataclasses.dataclass
class Context:
  """What every stage needs: config, data, mesh, where to write."""

  config: Any
  data: Any  # job/data/images.py Dataset or a streaming source with the same interface
  mesh: train_lib.Mesh1D
  writer: report_lib.MetricWriter
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
  """An ``extra_loss`` for :meth:`Context.train`: ``weight`` x the library's
  :func:`gkq_jax.distillation_loss` from the ``teacher`` variables (same model);
  None when ``weight <= 0``."""
  if weight <= 0:
    return None

  def extra(params, x, logits):
    teacher_state = state.replace(batch_stats=teacher["batch_stats"])
    teacher_logits, _ = train_lib.apply_model(teacher_state, teacher["params"], x, False)
    return weight * gkq.distillation_loss(logits, teacher_logits, temperature)

  return extra


def release_compiled() -> None:
  """Drops every compiled program JAX holds, between the stages / methods of a long study.

  Each XLA CPU executable keeps a few memory mappings of its own, and every
  method trains, evaluates and measures through programs of its own shapes; a
  survey or equal-bytes study in one process kept them all and could reach the
  kernel's limit of 65,530 mappings (vm.max_map_count), where XLA crashes, as
  the test suite did before tests/conftest.py cleared the caches per module.
  What a later method needs is compiled again (seconds); ``tools/map_count.py``
  measures the peak with and without this.
  """
  jax.clear_caches()
  gc.collect()
