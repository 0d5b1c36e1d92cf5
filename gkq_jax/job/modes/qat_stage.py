"""Quantization-aware retraining on the codebooks, between quantization and fine-tuning.

Fine-tuning on shared values moves only the codebook entries: at 12-24 values
per layer that is a few dozen numbers, too few to win back what a 50x file
loses. The ``qat`` stage trains the float weights instead, through the values
they are assigned to now (:func:`gkq_jax.fake_reassign`, straight-through
gradient), so weights change cluster where the loss asks; the assignment is
the quantizer's own (nearest entry for k-means layers, ECSQ's distortion +
price x code length for layers the budget gave an ECSQ price), so the coded
size stays near the budget. After each epoch :func:`gkq_jax.reassign` moves
each entry to the weighted mean of its new members.

Each epoch is a stage of its own (``qat_1`` ..), checkpointed; the optimiser
state, and with it the learning-rate schedule, carries across them, and the
codebooks of epoch e are a pure function of the weights after epoch e - 1, so
a rerun replays finished epochs and resumes the interrupted one exactly.
"""

from __future__ import annotations

import jax
from absl import logging

import gkq_jax as gkq
from gkq_jax.job import context
from gkq_jax.job.modes import budget as budget_lib
from gkq_jax.job.training import train as train_lib


def check_config(config) -> None:
  q = config.qat
  if not isinstance(q.epochs, int) or q.epochs < 0:
    raise ValueError(f"qat.epochs must be an integer >= 0, got {q.epochs!r}.")
  if not q.learning_rate > 0:
    raise ValueError(f"qat.learning_rate must be > 0, got {q.learning_rate!r}.")
  if q.enabled and config.quantize.granularity in ("row", "vector"):
    raise ValueError(f"qat re-assigns scalar weights; quantize.granularity="
                     f"{config.quantize.granularity!r} shares vectors: use 'layer' or "
                     "'channel', or set qat.enabled=False.")


def _snapping_apply(apply_fn, quantized, importance, prices, masks):
  """The model's apply with its clustered params on their assigned values."""

  def apply(variables, x, **kwargs):
    params = gkq.fake_reassign(variables["params"], quantized, importance, prices=prices,
                               masks=masks)
    return apply_fn(dict(variables, params=params), x, **kwargs)

  return apply


def fit_budget(refit, params, quantized, prices: dict, file_bytes, budget: int):
  """(quantized, prices): ``refit`` at the ECSQ prices times one factor s, the
  smallest s in [1/8, 256] (bisection over log s) whose file takes at most
  ``budget`` bytes, so the coded size stays at the budget as the weights move;
  None when even s = 256 does not fit or no layer has a price."""
  if not prices:
    return None
  scaled = lambda s: {path: price * s for path, price in prices.items()}
  fits = lambda s: file_bytes(refit(params, quantized, prices=scaled(s))) <= budget
  lo, hi = -3.0, 8.0  # log2 s
  if fits(2.0 ** lo):
    return refit(params, quantized, prices=scaled(2.0 ** lo)), scaled(2.0 ** lo)
  if not fits(2.0 ** hi):
    return None
  for _ in range(12):
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if fits(2.0 ** mid) else (mid, hi)
  return refit(params, quantized, prices=scaled(2.0 ** hi)), scaled(2.0 ** hi)


def run(ctx, state, quantized, importance, prices, masks, teacher=None):
  """``qat.epochs`` of training through the codebooks (distilling from
  ``teacher``'s variables with weight ``qat.distill``); returns (state with the
  latent float weights and the model's own apply, quantized re-fitted to them,
  whether it was kept within ``quantize.budget_bytes``).

  With a budget, after each epoch the re-fitted codebooks take the prices that
  keep the file within it (:func:`fit_budget`); when none can, the last
  re-fit is returned with ``within=False`` (the caller re-quantizes).
  """
  cfg = ctx.config.qat
  apply_fn = state.apply_fn
  extra_loss = context.distillation_loss(state, teacher, cfg.distill) if teacher else None
  budget = int(ctx.config.quantize.budget_bytes)
  measure = lambda q: budget_lib.file_bytes(state, q)[0]  # noqa: E731
  tx = ctx.optimizer(cfg.epochs, cfg.learning_rate)
  if masks is not None:
    tx = gkq.keep_pruned(tx, masks)
  state = train_lib.TrainState.create(apply_fn=apply_fn, params=state.params, tx=tx,
                                      batch_stats=state.batch_stats)
  jitted = jax.jit(gkq.reassign)
  refit = lambda params, q, prices: jitted(params, q, importance, prices=prices, masks=masks)
  within = True
  for epoch in range(cfg.epochs):
    state = state.replace(apply_fn=_snapping_apply(apply_fn, quantized, importance, prices,
                                                   masks))
    # One stage per epoch, each in a new batch order.
    state = ctx.train(state, 1, f"qat_{epoch + 1}", extra_loss,
                      seed=ctx.config.seed + 1 + epoch)
    kept = fit_budget(refit, state.params, quantized, prices, measure, budget) if budget else None
    within = not budget or kept is not None
    if kept is None:
      quantized = refit(state.params, quantized, prices)
    else:
      quantized, prices = kept
    logging.info("qat epoch %d: codebooks re-fitted; prices per bit %s", epoch + 1,
                 {path: f"{price:.3g}" for path, price in prices.items()})
  return state.replace(apply_fn=apply_fn), quantized, within
