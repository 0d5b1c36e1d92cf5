"""Re-assignment to codebooks and the straight-through forward (gkq_jax.reassign)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gkq_jax as gkq


def _layer(seed=0, shape=(60, 8), k=5, masks=None, importance=None):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape).astype(np.float32)
  params = {"dense": {"kernel": w, "bias": np.zeros(shape[-1], np.float32)}}
  q = gkq.quantize(params, importance, [gkq.ClusterRule("kernel$", k)], masks=masks)
  return params, q, rng


def test_price_zero_takes_the_nearest_entry_and_weighted_means():
  params, q, rng = _layer()
  moved = params["dense"]["kernel"] + 0.4 * rng.standard_normal((60, 8)).astype(np.float32)
  h = rng.random((60, 8)).astype(np.float32) + 0.1
  new = {"dense": {"kernel": moved, "bias": params["dense"]["bias"]}}
  imp = {"dense": {"kernel": h, "bias": None}}
  out = gkq.reassign(new, q, imp)["dense"]["kernel"]
  book = np.asarray(q["dense"]["kernel"].codebook)[0]
  nearest = np.argmin(np.abs(moved[..., None] - book), axis=-1)
  np.testing.assert_array_equal(np.asarray(out.indices), nearest)
  for j in range(book.size):
    members = nearest == j
    expected = (h[members] * moved[members]).sum() / h[members].sum() if members.any() \
        else book[j]
    np.testing.assert_allclose(float(out.codebook[0, j]), expected, rtol=1e-5)


def test_converged_weighted_kmeans_is_a_fixed_point():
  rng = np.random.default_rng(3)
  w = rng.standard_normal((200, 4)).astype(np.float32)
  h = (rng.random((200, 4)) + 0.1).astype(np.float32)
  params, imp = {"w": w}, {"w": h}
  q = gkq.quantize(params, imp, [gkq.ClusterRule("w", 6)], method="lloyd", max_iter=200,
                   tol=0.0)
  again = gkq.reassign(params, q, imp)
  np.testing.assert_array_equal(np.asarray(again["w"].indices), np.asarray(q["w"].indices))
  np.testing.assert_allclose(np.asarray(again["w"].codebook), np.asarray(q["w"].codebook),
                             rtol=1e-5)


def test_a_price_never_increases_the_ecsq_objective_and_prunes_more():
  rng = np.random.default_rng(1)
  w = (rng.standard_normal((300, 5)) * 0.1).astype(np.float32)
  w[rng.random(w.shape) < 0.5] = 0
  masks = {"w": w != 0}
  h = (rng.random(w.shape) ** 2 + 0.01).astype(np.float32)
  q = gkq.quantize({"w": w}, {"w": h}, [gkq.ClusterRule("w", 8)], masks=masks)
  moved = np.where(masks["w"], w + 0.03 * rng.standard_normal(w.shape), 0).astype(np.float32)

  def objective(leaf, lam):
    book, idx = np.asarray(leaf.codebook)[0], np.asarray(leaf.indices).reshape(-1)
    return gkq.ecsq_objective(moved.reshape(-1), h.reshape(-1), book, idx, lam)

  start = q["w"]
  zeros = []
  for lam in (0.0, 1e-4, 1e-3):
    out = gkq.reassign({"w": moved}, q, {"w": h}, prices={"w": lam}, masks=masks)["w"]
    assert objective(out, lam) <= objective(start, lam) + 1e-9, lam
    idx = np.asarray(out.indices)
    assert np.all(idx[~masks["w"]] == 0)  # pruned weights stay on the pinned zero
    assert float(out.codebook[0, 0]) == 0.0
    zeros.append(int((idx == 0).sum()))
  assert zeros[0] < zeros[1] < zeros[2]  # cheaper codes win more weights as the price grows


def test_each_channel_uses_its_own_codebook():
  rng = np.random.default_rng(2)
  w = (rng.standard_normal((40, 3)) * np.array([0.1, 1.0, 10.0])).astype(np.float32)
  q = gkq.quantize({"w": w}, None, [gkq.ClusterRule("w", 4)], granularity="channel")
  moved = w * 1.1
  out = gkq.reassign({"w": moved}, q)["w"]
  book = np.asarray(q["w"].codebook)  # (3, 4)
  nearest = np.argmin(np.abs(moved[:, :, None] - book[None, :, :]), axis=-1)
  np.testing.assert_array_equal(np.asarray(out.indices), nearest)


def test_fake_reassign_forward_is_the_assigned_value_and_gradient_passes_through():
  params, q, rng = _layer(seed=4)
  moved = {"dense": {"kernel": params["dense"]["kernel"] * 0.7,
                     "bias": np.ones(8, np.float32)}}
  out = jax.jit(gkq.fake_reassign)(moved, q)
  expected = gkq.dequantize(gkq.reassign(moved, q))["dense"]["kernel"]
  book = np.asarray(q["dense"]["kernel"].codebook)[0]
  idx = np.asarray(gkq.reassign(moved, q)["dense"]["kernel"].indices)
  np.testing.assert_array_equal(np.asarray(out["dense"]["kernel"]), book[idx])
  assert np.asarray(expected).shape == (60, 8)
  np.testing.assert_array_equal(out["dense"]["bias"], moved["dense"]["bias"])  # not clustered
  probe = jnp.asarray(rng.standard_normal((60, 8)), jnp.float32)
  grad = jax.grad(lambda p: jnp.sum(gkq.fake_reassign(p, q)["dense"]["kernel"] * probe))(moved)
  np.testing.assert_allclose(np.asarray(grad["dense"]["kernel"]), np.asarray(probe))


def test_jitted_reassign_with_traced_prices_equals_eager():
  rng = np.random.default_rng(5)
  w = (rng.standard_normal((100, 4)) * 0.1).astype(np.float32)
  h = (rng.random(w.shape) + 0.1).astype(np.float32)
  q = gkq.quantize({"w": w}, {"w": h}, [gkq.ClusterRule("w", 6)])
  eager = gkq.reassign({"w": w * 1.2}, q, {"w": h}, prices={"w": 1e-3})
  jitted = jax.jit(gkq.reassign)({"w": w * 1.2}, q, {"w": h}, prices={"w": 1e-3})
  np.testing.assert_array_equal(np.asarray(eager["w"].indices), np.asarray(jitted["w"].indices))


def test_bad_inputs_name_the_problem():
  params, q, _ = _layer()
  with pytest.raises(ValueError, match="price per bit must be >= 0"):
    gkq.reassign(params, q, prices={"dense/kernel": -1.0})
  with pytest.raises(ValueError, match="prices name 'dense/kernl'"):
    gkq.reassign(params, q, prices={"dense/kernl": 1.0})
  with pytest.raises(ValueError, match="dense/kernel: params have shape"):
    gkq.reassign({"dense": {"kernel": np.zeros((4, 8)), "bias": np.zeros(8)}}, q)
  with pytest.raises(ValueError, match="missing from params"):
    gkq.reassign({"other": params["dense"]}, q)
  with pytest.raises(ValueError, match="no pinned zero"):
    mask = np.ones((60, 8), bool)
    mask[0, 0] = False
    gkq.reassign(params, q, masks={"dense": {"kernel": mask, "bias": np.ones(8, bool)}})
  conv = {"conv": {"kernel": np.random.default_rng(0).standard_normal((3, 3, 2, 4))}}
  vq = gkq.quantize(conv, None, [gkq.ClusterRule("kernel$", 4)], granularity="vector")
  with pytest.raises(ValueError, match="conv/kernel: reassignment takes scalar codebooks"):
    gkq.reassign(conv, vq)
