"""The compression pipeline: prune -> importance -> quantize -> fine-tune -> encode.

Every stage starts from a state computed deterministically from the previous
stage's final state, and every training stage checkpoints each epoch, so a
rerun with the same workdir replays finished stages from their checkpoints and
resumes the one that was interrupted. Nothing a stage wrote is removed by a
later one.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

import gkq_jax as gkq
from gkq_jax import data as data_lib
from gkq_jax import prune as prune_lib
from gkq_jax import rules as rules_lib
from gkq_jax import share as share_lib
from gkq_jax import train as train_lib


def cluster_rules(config) -> list[rules_lib.ClusterRule]:
  """Rules from ``quantize.rules`` ("regex=bits" strings) then the default
  ``quantize.bits`` for every Dense/Conv kernel."""
  rules = []
  for text in config.quantize.rules:
    pattern, sep, bits = str(text).rpartition("=")
    if not sep or not bits.strip().isdigit():
      raise ValueError(f"quantize.rules entry {text!r} must look like 'regex=bits', "
                       "e.g. 'Dense_0/kernel$=6'.")
    rules.append(rules_lib.bits_rule(pattern, int(bits)))
  rules.append(rules_lib.bits_rule(r"(^|/)kernel$", int(config.quantize.bits)))
  return rules


def selected_leaves(params, rules) -> Any:
  """True for the leaves the rules cluster (and pruning may touch)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, w: rules_lib.match(rules, rules_lib.path_string(p), w) > 0, params)


@dataclasses.dataclass
class Context:
  """What every stage needs: data, mesh, config, where to write."""

  config: Any
  ds: data_lib.Dataset
  mesh: train_lib.Mesh1D
  writer: train_lib.MetricWriter
  workdir: Any

  @property
  def steps_per_epoch(self):
    return max(1, len(self.ds.train_x) // self.config.batch_size)

  def evaluate(self, state, params=None) -> float:
    return train_lib.evaluate(state, self.ds, self.config.eval_batch_size, self.mesh,
                              params)["test_accuracy"]

  def retrain(self, state, tx, epochs, stage, extra_loss=None):
    """A fresh optimiser on the current weights, trained ``epochs`` epochs."""
    state = train_lib.TrainState.create(apply_fn=state.apply_fn, params=state.params, tx=tx,
                                        batch_stats=state.batch_stats)
    return train_lib.fit(state, self.ds, self.config, num_epochs=epochs, workdir=self.workdir,
                         stage=stage, mesh=self.mesh, writer=self.writer,
                         extra_loss=extra_loss)


def _optimizer(ctx, epochs, learning_rate):
  return train_lib.create_optimizer(ctx.config, ctx.steps_per_epoch, epochs, learning_rate)


def prune_stage(ctx: Context, state, rules, teacher=None):
  """Iterative magnitude pruning with retraining; returns (state, masks)."""
  cfg = ctx.config.prune
  selected = selected_leaves(state.params, rules)
  extra = distillation_loss(state, teacher, cfg.distill) if teacher else None
  masks = None
  for i, quality in enumerate(cfg.qualities):
    # Host copies: the optimiser state that holds them is donated every step.
    masks = jax.tree.map(np.asarray, prune_lib.magnitude_masks(state.params, selected,
                                                               float(quality)))
    state = state.replace(params=prune_lib.apply_masks(state.params, masks))
    tx = prune_lib.keep_pruned(_optimizer(ctx, cfg.epochs_per_round, cfg.learning_rate), masks)
    state = ctx.retrain(state, tx, cfg.epochs_per_round, f"prune_{i + 1}", extra)
    logging.info("prune round %d (quality %.2f): %.1f%% of selected weights kept", i + 1,
                 quality, 100 * (1 - prune_lib.sparsity(state.params, selected)))
  return state, masks


def importance_of(ctx: Context, state, kind: str):
  """Importance of ``state.params`` from ``quantize.importance_batches`` batches."""

  def loss_fn(params, batch):
    logits, _ = train_lib.apply_model(state, params, batch[0], False)
    return train_lib.cross_entropy(logits, batch[1])

  batches = data_lib.train_batches(ctx.ds, ctx.config.batch_size, ctx.config.seed, 10_000)
  limited = (b for _, b in zip(range(ctx.config.quantize.importance_batches), batches))
  return gkq.compute_importance(loss_fn, state.params, limited, kind)


def quantize_params(ctx: Context, state, rules, masks):
  q = ctx.config.quantize
  # importance "none" gives all ones: the same clustering as no importance.
  imp = importance_of(ctx, state, q.importance)
  return gkq.quantize(state.params, imp, rules, granularity=q.granularity, masks=masks,
                      key=jax.random.PRNGKey(ctx.config.seed), method=q.method, init=q.init,
                      objective=q.objective)


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


def finetune_stage(ctx: Context, state, quantized, masks, teacher=None, stage="finetune",
                   epochs=None):
  cfg = ctx.config.finetune
  epochs = cfg.epochs if epochs is None else epochs
  params = gkq.dequantize(quantized)
  state = state.replace(params=params)
  if epochs <= 0:
    return state, quantized
  inner = _optimizer(ctx, epochs, cfg.learning_rate)
  if masks is not None:
    inner = prune_lib.keep_pruned(inner, masks)
  tx = optax.chain(inner, share_lib.share_centroids(quantized, cfg.reduce))
  extra = distillation_loss(state, teacher, cfg.distill) if teacher else None
  state = ctx.retrain(state, tx, epochs, stage, extra)
  return state, share_lib.refresh_codebooks(quantized, state.params)


def check_rules_match(params, rules):
  """The user's rules (all but the default) must each select something."""
  paths = [rules_lib.path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  rules_lib.check_all_used(rules[:-1], paths)
  if not any(re.search(rules[-1].pattern, p) for p in paths):
    raise ValueError(f"no parameter path ends in 'kernel'; add quantize.rules for {paths[:4]}")
