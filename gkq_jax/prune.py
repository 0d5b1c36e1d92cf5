"""Magnitude pruning (Han et al.): masks and an optax wrapper that keeps them.

The threshold of a layer is ``quality x std(layer weights)``; weights with a
smaller magnitude are removed. Already-pruned weights (exact zeros) do not
count towards the std of later rounds, so iterative rounds prune further.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def magnitude_masks(params: Any, selected: Any, quality: float) -> Any:
  """True where a weight is kept. ``selected``: pytree of bools (leaf-level),
  False leaves get an all-True mask (never pruned)."""
  if quality < 0:
    raise ValueError(f"prune quality must be >= 0, got {quality}.")

  def mask(w, use):
    if not use:
      return jnp.ones(jnp.shape(w), bool)
    alive = w != 0
    n = jnp.maximum(alive.sum(), 1)
    mean = jnp.sum(jnp.where(alive, w, 0)) / n
    std = jnp.sqrt(jnp.sum(jnp.where(alive, (w - mean) ** 2, 0)) / n)
    return alive & (jnp.abs(w) >= quality * std)

  return jax.tree.map(mask, params, selected)


def apply_masks(params: Any, masks: Any) -> Any:
  return jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros_like(w)), params, masks)


class KeepPrunedState(NamedTuple):
  inner: optax.OptState
  masks: Any


def keep_pruned(inner: optax.GradientTransformation, masks: Any) -> optax.GradientTransformation:
  """Wraps an optimiser so pruned weights stay exactly zero.

  Gradients of pruned weights are zeroed before ``inner`` (so momentum and
  Adam moments never build up for them) and their updates after it (so weight
  decay or any other term cannot move them).
  """

  def zero(tree, masks):
    return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), tree, masks)

  def init_fn(params):
    return KeepPrunedState(inner.init(params), masks)

  def update_fn(updates, state, params=None):
    updates, inner_state = inner.update(zero(updates, state.masks), state.inner, params)
    return zero(updates, state.masks), KeepPrunedState(inner_state, state.masks)

  return optax.GradientTransformation(init_fn, update_fn)


def sparsity(params: Any, selected: Any) -> float:
  """Fraction of zeros among the selected leaves."""
  total = zeros = 0
  for w, use in zip(jax.tree.leaves(params), jax.tree.leaves(selected)):
    if use:
      total += w.size
      zeros += int((w == 0).sum())
  return zeros / max(total, 1)
