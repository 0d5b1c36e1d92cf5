"""Deep k-Means in the pipeline: the retraining stage, conv kernels as vectors, their accounting.

* :func:`run`: the ``dkm`` stage before quantization. ``dkm.epochs`` of
  training with the k-means regulariser (:mod:`gkq_jax.dkm`, strength
  ``dkm.strength`` = lambda, F refreshed every ``dkm.refresh_every`` steps),
  at the K the quantization rules give. F lives in the optimiser state, so the
  stage's per-epoch checkpoints carry it and a resumed run continues with the
  F an uninterrupted one would have.
* :func:`quantize`: ``quantize.granularity`` "row" / "vector" share the conv
  kernels as kernel rows / filters and cluster the other selected parameters
  (Dense kernels) as scalars, one codebook per layer; the regulariser follows
  the same split.
* :func:`deep_kmeans_accounting`: Deep k-Means' compression ratio (conv layers
  only: K x d x 32 bits of codebook plus N x H bits of indices, H the entropy
  of the indices), printed beside our real file's.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
import optax

import gkq_jax as gkq
from gkq_jax.job import context

VECTOR_GRANULARITIES = ("row", "vector")
IMPORTANCE = ("none", "grad_sq", "abs_grad")


def check_config(config) -> None:
  """The dkm block's settings (run by ``run.check_config`` before any training)."""
  d = config.dkm
  if not isinstance(d.strength, (int, float)) or not math.isfinite(d.strength) or d.strength < 0:
    raise ValueError(f"dkm.strength (the regulariser's lambda) must be a number >= 0, got "
                     f"{d.strength!r}.")
  if not isinstance(d.strength_start, (int, float)) or d.strength_start < 0 or (
      d.strength_start and not d.strength):
    raise ValueError(f"dkm.strength_start (first lambda of a geometric ramp to dkm.strength; "
                     f"0: no ramp) must be >= 0 with dkm.strength > 0, got {d.strength_start!r}.")
  if not isinstance(d.refresh_every, int) or d.refresh_every < 1:
    raise ValueError(f"dkm.refresh_every (T, steps between refreshes of F) must be an integer "
                     f">= 1, got {d.refresh_every!r}.")
  if not isinstance(d.epochs, int) or d.epochs < 0:
    raise ValueError(f"dkm.epochs must be an integer >= 0, got {d.epochs!r}.")
  if d.form not in gkq.DKM_FORMS:
    raise ValueError(f"dkm.form={d.form!r} is not one of {gkq.DKM_FORMS}.")
  if d.importance not in IMPORTANCE:
    raise ValueError(f"dkm.importance={d.importance!r} is not one of {IMPORTANCE}.")
  if d.on_degenerate not in gkq.DKM_ON_DEGENERATE:
    raise ValueError(f"dkm.on_degenerate={d.on_degenerate!r} is not one of "
                     f"{gkq.DKM_ON_DEGENERATE}.")
  if config.quantize.granularity in VECTOR_GRANULARITIES and config.prune.enabled:
    raise ValueError(f"quantize.granularity={config.quantize.granularity!r} has no pinned zero "
                     "for pruned weights; set prune.enabled=False or quantize.granularity="
                     "'layer'.")


def split_rules(params, rules) -> tuple[list, list]:
  """(rules of the selected conv kernels, rules of the other selected leaves), one
  exact-path rule per leaf with the K the rules give it."""
  conv, other = [], []
  for path, leaf in gkq.named_leaves(params):
    k = gkq.clusters_for(rules, path, leaf)
    if k > 0:
      rule = gkq.ClusterRule("^" + re.escape(path) + "$", k, min_ndim=0)
      (conv if np.ndim(leaf) >= 3 else other).append(rule)
  return conv, other


def quantize(params, importance, rules, granularity: str, **options):
  """``gkq.quantize``; "row" / "vector" apply to conv kernels, Dense kernels go per layer."""
  if granularity not in VECTOR_GRANULARITIES:
    return gkq.quantize(params, importance, rules, granularity=granularity, **options)
  conv, other = split_rules(params, rules)
  parts = [gkq.quantize(params, importance, conv, granularity=granularity, **options)] \
      if conv else []
  if other:
    parts.append(gkq.quantize(params, importance, other, granularity="layer", **options))
  if not parts:
    raise ValueError("no parameter is selected for clustering: check quantize.rules.")
  if len(parts) == 1:
    return parts[0]
  return jax.tree.map(lambda a, b: a if gkq.is_clustered(a) else b, *parts,
                      is_leaf=gkq.is_clustered)


def regularizer(params, rules, granularity: str, importance, cfg, seed: int):
  """The regulariser's state at the quantizer's K and split (conv rows / filters
  for "row" / "vector", scalars otherwise)."""
  options = {"form": cfg.form, "on_degenerate": cfg.on_degenerate}
  key = jax.random.PRNGKey(seed)
  if granularity not in VECTOR_GRANULARITIES:
    return gkq.kmeans_regularizer_init(params, rules, importance, key=key, **options)
  conv, other = split_rules(params, rules)
  states = []
  if conv:
    states.append(gkq.kmeans_regularizer_init(params, conv, importance, granularity=granularity,
                                              key=key, **options))
  if other:
    states.append(gkq.kmeans_regularizer_init(params, other, importance,
                                              key=jax.random.fold_in(key, 1), **options))
  return gkq.merge_states(*states)


def run(ctx, state, rules, masks):
  """The dkm stage: ``dkm.epochs`` of training with the k-means regulariser."""
  config = ctx.config
  cfg = config.dkm
  imp = None if cfg.importance == "none" else context.importance_of(ctx, state, cfg.importance)
  reg = regularizer(state.params, rules, config.quantize.granularity, imp, cfg, config.seed)
  strength = float(cfg.strength)
  if cfg.strength_start:  # geometric ramp from strength_start to strength over the stage
    strength = gkq.strength_ramp(float(cfg.strength_start), strength,
                                 cfg.epochs * ctx.steps_per_epoch)
  tx = optax.chain(gkq.add_kmeans_regularizer(reg, strength, int(cfg.refresh_every)),
                   ctx.optimizer(cfg.epochs, cfg.learning_rate))
  if masks is not None:
    tx = gkq.keep_pruned(tx, masks)
  return ctx.retrain(state, tx, cfg.epochs, "dkm")


def deep_kmeans_accounting(quantized) -> dict:
  """Deep k-Means' ratio over the conv kernels shared as vectors: 32 bits per
  weight against K x d x 32 codebook bits plus N x H index bits (H the empirical
  entropy of the indices, bits per vector). Empty when no leaf is vector-shared."""
  fp32_bits, coded_bits = 0.0, 0.0
  for _, leaf in gkq.clustered_leaves(quantized):
    if leaf.vector_shape is None:
      continue
    idx = np.asarray(leaf.indices).reshape(-1)
    p = np.bincount(idx, minlength=leaf.num_clusters) / idx.size
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    fp32_bits += 32.0 * int(np.prod(leaf.shape))
    coded_bits += 32.0 * np.asarray(leaf.codebook).size + idx.size * entropy
  if not fp32_bits:
    return {}
  return {"deep_kmeans_ratio": fp32_bits / coded_bits, "deep_kmeans_conv_bits": coded_bits}
