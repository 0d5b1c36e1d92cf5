"""The energy model (gkq_jax.energy): MAC counts and energies against hand computations."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gkq_jax as gkq


class LeNet300100(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(300)(x))
    x = nn.relu(nn.Dense(100)(x))
    return nn.Dense(10)(x)


class LeNet5(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.max_pool(nn.Conv(20, (5, 5), padding="VALID")(x), (2, 2), (2, 2))
    x = nn.max_pool(nn.Conv(50, (5, 5), padding="VALID")(x), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(500)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


class Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(3)(x))
    return nn.Dense(2)(x)


def _init(model, x, seed=0):
  """Variables with no exact zeros (flax zero-initialises biases, which would be stored sparse)."""
  init = lambda key: jax.tree.map(lambda a: jnp.where(a == 0, 0.01, a), model.init(key, x))
  return jax.jit(init)(jax.random.PRNGKey(seed))  # one compile instead of op by op


def _energy(model, params, x, **kw):
  return gkq.estimate_energy(lambda p, x: model.apply(p, x), params, x, **kw)


@pytest.mark.parametrize("model, hand_macs", [
    (LeNet300100(), 784 * 300 + 300 * 100 + 100 * 10),
    # conv1: 24x24x20 outputs x 5x5x1 taps; conv2: 8x8x50 x 5x5x20; fc 800x500, 500x10
    (LeNet5(), 24 * 24 * 20 * 25 + 8 * 8 * 50 * 25 * 20 + 800 * 500 + 500 * 10),
])
def test_macs_match_a_hand_count_and_xla(model, hand_macs):
  x = jnp.ones((3, 28, 28, 1))  # per example: three examples count once
  params = _init(model, x)
  est = _energy(model, params, x)
  assert est.dense_macs == hand_macs
  # XLA's flops: 2 per MAC plus the element-wise work (bias, ReLU, pooling).
  assert 2 * hand_macs <= est.xla_flops <= 2.05 * hand_macs
  fp32_mac = 3.7 + 0.9
  assert est.mac_uj == pytest.approx(hand_macs * fp32_mac * 1e-6)
  weights = sum(np.size(w) for w in jax.tree.leaves(params))
  assert est.weight_dram_uj == pytest.approx(weights * 640 * 1e-6)


@pytest.fixture(scope="module")
def tiny():
  model = Tiny()
  x = jnp.ones((1, 4))
  params = _init(model, x, seed=1)
  return model, params, x


def test_fp32_energy_by_hand(tiny):
  model, params, x = tiny
  est = _energy(model, params, x)
  macs = 4 * 3 + 3 * 2
  words = 4 * 3 + 3 + 3 * 2 + 2
  activations = (4 + 3) + (3 + 2)  # each MAC op reads its input, writes its output
  assert est.macs == macs
  assert est.mac_uj == pytest.approx(macs * 4.6e-6)
  assert est.weight_dram_uj == pytest.approx(words * 640e-6)
  assert est.activation_uj == pytest.approx(activations * 5e-6)
  assert est.codebook_sram_uj == 0
  assert est.total_uj == pytest.approx((macs * 4.6 + words * 640 + activations * 5) * 1e-6)
  json.dumps(est.as_dict())


def test_quantized_energy_by_hand(tiny):
  model, params, x = tiny
  rules = [gkq.ClusterRule("Dense_0/kernel$", 4), gkq.ClusterRule("Dense_1/kernel$", 2)]
  q = gkq.quantize(params, None, rules)
  est = _energy(model, q, x)
  index_bits = 4 * 3 * 2 + 3 * 2 * 1  # 2-bit and 1-bit indices
  book_bits = (4 + 2) * 32
  bias_bits = (3 + 2) * 32
  assert est.weight_bits == index_bits + book_bits + bias_bits
  assert est.weight_dram_uj == pytest.approx((index_bits + book_bits + bias_bits) / 32 * 640e-6)
  assert est.mac_uj == pytest.approx(18 * (0.2 + 0.03) * 1e-6)  # int8 MACs
  assert est.codebook_sram_uj == pytest.approx(18 * 5e-6)  # one look-up per stored index
  float_datapath = _energy(model, q, x, clustered_mac_bits=32)
  assert float_datapath.mac_uj == pytest.approx(18 * 4.6e-6)
  # Weights read once per batch of 8: weight traffic / 8, MACs unchanged.
  batched = _energy(model, q, x, batch_size=8)
  assert batched.weight_dram_uj == pytest.approx(est.weight_dram_uj / 8)
  assert batched.mac_uj == pytest.approx(est.mac_uj)
  # The bytes a real file stores replace the estimate for that leaf.
  override = _energy(model, q, x, stored_bytes={"params/Dense_0/kernel": 100})
  assert override.weight_bits == 800 + 3 * 2 * 1 + 2 * 32 + bias_bits


def test_zeros_are_skipped_and_stored_sparse(tiny):
  model, params, x = tiny
  kernel = np.asarray(params["params"]["Dense_0"]["kernel"]).copy()
  kernel.reshape(-1)[::2] = 0  # half of the 12 weights
  pruned = jax.tree.map(lambda a: a, params)
  pruned["params"]["Dense_0"]["kernel"] = jnp.asarray(kernel)
  est = _energy(model, pruned, x, sparse_index_bits=5)
  row = {r["layer"]: r for r in est.layers}["params/Dense_0/kernel"]
  assert row["density"] == 0.5 and row["macs"] == 6
  assert row["stored_bits"] == min(12 * 32, 6 * (32 + 5))
  dense = _energy(model, pruned, x, skip_zeros=False)
  assert dense.macs == 18 and {r["layer"]: r for r in dense.layers}[
      "params/Dense_0/kernel"]["stored_bits"] == 12 * 32


def test_costs_are_overridable_and_checked(tiny):
  model, params, x = tiny
  cheap = _energy(model, params, x, costs=gkq.EnergyCosts(dram_read_pj=64.0))
  assert cheap.weight_dram_uj == pytest.approx(23 * 64e-6)
  with pytest.raises(ValueError, match="dram_read_pj"):
    gkq.EnergyCosts(dram_read_pj=-1.0)
  with pytest.raises(ValueError, match="batch_size"):
    _energy(model, params, x, batch_size=0)
  with pytest.raises(ValueError, match="stored_bytes"):
    _energy(model, params, x, stored_bytes={"params/nope": 3})


def test_scan_counts_its_body_length_times():
  w = jnp.ones((5, 5))

  def apply(params, x):
    def body(h, _):
      return h @ params["w"], None
    return jax.lax.scan(body, x, None, length=4)[0]

  est = gkq.estimate_energy(apply, {"w": w}, jnp.ones((1, 5)), xla_check=False)
  assert est.dense_macs == 4 * 25
  assert est.layers[0]["macs"] == 4 * 25
