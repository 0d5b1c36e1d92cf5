"""Magnitude pruning (Han et al.): masks and an optax wrapper that keeps them.

The threshold of a layer is ``quality x std(layer weights)``; weights with a
smaller magnitude are removed. Already-pruned weights (exact zeros) do not
count towards the std of later rounds, so iterative rounds prune further.

Optimal Brain Damage (LeCun et al. 1990) with the Fisher diagonal:
:func:`saliency_masks` removes exactly the requested fraction of weights with
the smallest saliency ``h_i w_i^2`` (h = mean g^2, the importance the
quantizer uses), per layer or over all selected layers at once;
:func:`cubic_sparsity` is Zhu & Gupta's gradual schedule.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def magnitude_masks(params: Any, selected: Any, quality: float) -> Any:
  """True where a weight is kept. ``selected``: pytree of bools (leaf-level),
  False leaves get an all-True mask (never pruned)."""
  if not isinstance(quality, jax.core.Tracer) and not 0 <= float(quality) < float("inf"):
    # NaN compares False with every |w| (all pruned); inf prunes everything too.
    raise ValueError(f"prune quality must be a finite number >= 0 (a multiple of the "
                     f"layer's std), got {quality}.")

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


# ------------------------------------------------------- Optimal Brain Damage

PRUNE_SCOPES = ("layer", "global")


def _check_sparsity(sparsity) -> float:
  if not 0 <= sparsity < 1:  # also rejects NaN
    raise ValueError(f"sparsity must be in [0, 1) (the fraction of weights removed), "
                     f"got {sparsity}.")
  return float(sparsity)


@jax.jit
def _saliency(w, h):
  """h w^2, flat; weights already at zero score -1 so that they go first."""
  w = jnp.asarray(w, jnp.float32).reshape(-1)
  return jnp.where(w != 0, jnp.asarray(h, jnp.float32).reshape(-1) * w * w, -1.0)


@functools.partial(jax.jit, static_argnames="num_pruned")
def _keep_salient(score, num_pruned):
  order = jnp.argsort(score, stable=True)  # ties by position: the count is exact
  return jnp.ones(score.shape, bool).at[order[:num_pruned]].set(False)


def saliency_masks(params: Any, importance: Any, selected: Any, sparsity: float,
                   scope: str = "layer") -> Any:
  """True where a weight is kept: exactly ``round(sparsity x n)`` of the
  selected weights are removed, those with the smallest saliency h w^2.

  Args:
    params: pytree of arrays.
    importance: pytree like params (e.g. ``compute_importance(...,
      kind="grad_sq")``, the Fisher diagonal), or None for h = 1 (magnitude).
    selected: pytree of bools (leaf-level); False leaves are never pruned.
    sparsity: fraction of weights to remove, in [0, 1).
    scope: "layer" (n = each selected leaf's size) or "global" (n = all
      selected weights, ranked together: layers whose weights matter less
      lose more).

  Weights already at exactly zero go first (their saliency is 0 anyway), and
  ties are broken by position, so the count is exact.
  """
  sparsity = _check_sparsity(sparsity)
  if scope not in PRUNE_SCOPES:
    raise ValueError(f"scope={scope!r} is not one of {PRUNE_SCOPES}.")
  leaves, treedef = jax.tree_util.tree_flatten(params)
  use = jax.tree_util.tree_leaves(selected)
  imps = [None] * len(leaves) if importance is None else jax.tree_util.tree_leaves(importance)
  if len(use) != len(leaves) or len(imps) != len(leaves):
    raise ValueError("selected and importance must have the same tree structure as params.")

  def score(w, h):
    return _saliency(w, jnp.ones(jnp.shape(w), jnp.float32) if h is None else h)

  def keep(s):
    return _keep_salient(s, int(round(sparsity * s.size)))

  chosen = [i for i, u in enumerate(use) if u]
  masks = [jnp.ones(jnp.shape(w), bool) for w in leaves]
  if scope == "layer":
    for i in chosen:
      masks[i] = keep(score(leaves[i], imps[i])).reshape(jnp.shape(leaves[i]))
  elif chosen:
    flat = keep(jnp.concatenate([score(leaves[i], imps[i]) for i in chosen]))
    offset = 0
    for i in chosen:
      n = int(jnp.size(leaves[i]))
      masks[i] = flat[offset:offset + n].reshape(jnp.shape(leaves[i]))
      offset += n
  return jax.tree_util.tree_unflatten(treedef, masks)


def cubic_sparsity(step, final_sparsity: float, end_step: int, begin_step: int = 0,
                   initial_sparsity: float = 0.0):
  """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_end - t_0))^3,
  held at s_i before ``begin_step`` and at s_f after ``end_step``: prunes
  fast while many redundant weights remain, slowly near the target."""
  final_sparsity = _check_sparsity(final_sparsity)
  initial_sparsity = _check_sparsity(initial_sparsity)
  if end_step <= begin_step:
    raise ValueError(f"end_step must be > begin_step, got {end_step} and {begin_step}.")
  progress = jnp.clip((step - begin_step) / (end_step - begin_step), 0.0, 1.0)
  return final_sparsity + (initial_sparsity - final_sparsity) * (1 - progress) ** 3
