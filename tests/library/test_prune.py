"""Magnitude pruning and the keep_pruned optimiser wrapper (gkq_jax.prune)."""

import jax.numpy as jnp
import optax

from gkq_jax import prune


def test_keep_pruned_zeroes_moments_and_decay():
  params = {"w": jnp.array([0.0, 2.0])}
  masks = {"w": jnp.array([False, True])}
  tx = prune.keep_pruned(optax.adamw(0.1, weight_decay=0.5), masks)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update({"w": jnp.array([5.0, 1.0])}, state, params)
    params = optax.apply_updates(params, updates)
  assert float(params["w"][0]) == 0.0 and float(params["w"][1]) != 2.0
  assert float(state.inner[0].mu["w"][0]) == 0.0
