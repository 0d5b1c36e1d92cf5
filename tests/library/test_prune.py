"""Magnitude pruning and the keep_pruned optimiser wrapper (gkq_jax.prune)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

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


@pytest.mark.parametrize("quality", [float("nan"), -0.5, float("inf")])
def test_magnitude_masks_rejects_meaningless_quality(quality):
  with pytest.raises(ValueError, match="quality must be a finite number >= 0"):
    prune.magnitude_masks({"w": jnp.ones(3)}, {"w": True}, quality)


# ------------------------------------------------------- Optimal Brain Damage


def _obd_model():
  rng = np.random.default_rng(0)
  params = {"a": rng.standard_normal((20, 10)).astype(np.float32),
            "b": rng.standard_normal((10, 5)).astype(np.float32),
            "bias": np.ones(5, np.float32)}
  importance = {"a": rng.random((20, 10)).astype(np.float32),
                "b": 100 * rng.random((10, 5)).astype(np.float32),  # b matters much more
                "bias": np.ones(5, np.float32)}
  selected = {"a": True, "b": True, "bias": False}
  return params, importance, selected


def test_obd_keeps_exactly_the_fraction_with_the_largest_saliency():
  params, importance, selected = _obd_model()
  for sparsity in (0.0, 0.3, 0.9):
    masks = prune.saliency_masks(params, importance, selected, sparsity)
    for name in ("a", "b"):
      saliency = importance[name] * params[name] ** 2
      m = np.asarray(masks[name])
      assert (~m).sum() == round(sparsity * m.size)
      if 0 < sparsity:  # every pruned weight is less salient than every kept one
        assert saliency[~m].max() <= saliency[m].min()
    assert np.all(np.asarray(masks["bias"]))
  # The saliency, not the magnitude: a large weight of tiny importance goes first.
  params["a"][0, 0], importance["a"][0, 0] = 5.0, 1e-6
  assert not bool(prune.saliency_masks(params, importance, selected, 0.1)["a"][0, 0])
  assert bool(prune.magnitude_masks(params, selected, 1.0)["a"][0, 0])


def test_obd_global_scope_prunes_the_unimportant_layer_more():
  params, importance, selected = _obd_model()
  masks = prune.saliency_masks(params, importance, selected, 0.5, scope="global")
  pruned = {n: float((~np.asarray(masks[n])).mean()) for n in ("a", "b")}
  assert round(pruned["a"] * 200 + pruned["b"] * 50) == 125
  assert pruned["a"] > 0.5 > pruned["b"]


def test_obd_prunes_zeros_first_so_rounds_only_add():
  params, importance, selected = _obd_model()
  first = prune.saliency_masks(params, importance, selected, 0.4)
  params = prune.apply_masks(params, first)
  second = prune.saliency_masks(params, importance, selected, 0.7)
  for name in ("a", "b"):
    assert not np.any(np.asarray(second[name]) & ~np.asarray(first[name]))


def test_cubic_sparsity_ramp():
  s = [float(prune.cubic_sparsity(t, 0.9, end_step=10)) for t in range(0, 13)]
  assert s[0] == 0.0 and s[10] == s[12] == pytest.approx(0.9)
  assert s[5] == pytest.approx(0.9 * (1 - 0.5 ** 3))
  assert all(b >= a for a, b in zip(s, s[1:]))
  assert s[1] - s[0] > s[9] - s[8]  # fast first, slow near the target


@pytest.mark.parametrize("sparsity", [1.0, -0.1, float("nan")])
def test_sparsity_outside_unit_interval_is_refused(sparsity):
  params, importance, selected = _obd_model()
  with pytest.raises(ValueError, match="sparsity must be in"):
    prune.saliency_masks(params, importance, selected, sparsity)
  with pytest.raises(ValueError, match="sparsity must be in"):
    prune.cubic_sparsity(1, sparsity, end_step=4)


def test_keep_pruned_zeroes_what_the_inner_optimiser_adds():
  # Terms the inner optimiser adds on its own (gradient noise; weight decay of a
  # weight the mask removes but that is not zero yet) must not reach pruned weights.
  masks = {"w": jnp.array([False, True, False])}
  params = {"w": jnp.array([0.0, 2.0, 1.5])}
  inner = optax.chain(optax.add_noise(1.0, 0.0, 0), optax.adamw(0.1, weight_decay=0.5))
  tx = prune.keep_pruned(inner, masks)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update({"w": jnp.array([5.0, 1.0, 5.0])}, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(np.asarray(params["w"])[[0, 2]], [0.0, 1.5])
  assert float(params["w"][1]) != 2.0
