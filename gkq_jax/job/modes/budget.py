"""A byte budget for the whole ``model.gkq`` file (``quantize.budget_bytes``):
the clustered leaves get what the raw leaves, the header and the checksum leave."""

from __future__ import annotations

import functools
import pathlib
import tempfile

import jax
from absl import logging

import gkq_jax as gkq


def file_bytes(state, quantized) -> tuple[int, int]:
  """(bytes of model.gkq holding ``quantized``, bytes of all but its clustered leaves)."""
  extra = {} if state.batch_stats is None else {"batch_stats": state.batch_stats}
  with tempfile.TemporaryDirectory() as folder:  # a measurement, not an output
    total, sizes = gkq.save(pathlib.Path(folder) / "trial.gkq", {"params": quantized, **extra})
  clustered = sum(sizes[p]["bytes"] for p, _ in gkq.clustered_leaves({"params": quantized}))
  return total, total - clustered


def budget_quantize(ctx, state, rules, masks, importance, results=None):
  """Quantizes so that the whole ``model.gkq`` takes at most
  ``quantize.budget_bytes`` (measured on trial files)."""
  q = ctx.config.quantize
  target = int(q.budget_bytes)
  measure = functools.partial(file_bytes, state)
  _, overhead = measure(gkq.quantize(state.params, None, rules, masks=masks))
  leaf_budget = target - overhead
  for attempt in range(8):  # the header's size moves a little with the codings chosen
    result = gkq.quantize_to_budget(
        state.params, importance, rules, leaf_budget, methods=tuple(q.budget_methods),
        allocation=q.allocation, masks=masks, pin_zero=q.pin_zero,
        clusters=tuple(q.budget_clusters), points=int(q.budget_points),
        key=jax.random.PRNGKey(ctx.config.seed),
        method=q.method, init=q.init, objective=q.objective)
    total, _ = measure(result.quantized)
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
