"""Importance from gradients (gkq_jax.importance)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gkq_jax as gkq


def test_importance_kinds_match_manual_gradients():
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  batches = [jnp.array([1.0, 2.0, 0.5]), jnp.array([-1.0, 0.0, 2.0])]

  def loss_fn(p, b):
    return jnp.sum(p["w"] * b) ** 2 / 2

  grads = [np.asarray(jax.grad(loss_fn)(params, b)["w"]) for b in batches]
  abs_imp = gkq.compute_importance(loss_fn, params, batches, "abs_grad")
  sq_imp = gkq.compute_importance(loss_fn, params, iter(batches), "grad_sq")
  np.testing.assert_allclose(abs_imp["w"], np.mean([np.abs(g) for g in grads], 0), rtol=1e-6)
  np.testing.assert_allclose(sq_imp["w"], np.mean([g ** 2 for g in grads], 0), rtol=1e-6)
  np.testing.assert_array_equal(gkq.compute_importance(loss_fn, params, [], "none")["w"],
                                np.ones(3))
  with pytest.raises(ValueError, match="batches is empty"):
    gkq.compute_importance(loss_fn, params, [], "abs_grad")
  with pytest.raises(ValueError, match="not one of"):
    gkq.compute_importance(loss_fn, params, batches, "hessian")


def test_damp_importance_adds_a_floor_of_the_leaf_mean():
  imp = {"w": jnp.array([0.0, 1.0, 5.0]), "skip": None}
  damped = gkq.damp_importance(imp, 0.5)
  np.testing.assert_allclose(np.asarray(damped["w"]), [1.0, 2.0, 6.0])
  assert damped["skip"] is None
  for bad in (-0.1, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="damping must be"):
      gkq.damp_importance(imp, bad)
