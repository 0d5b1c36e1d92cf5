"""Uniform QAT and binarized weights stored as codebooks (gkq_jax.qat)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gkq_jax as gkq
from gkq_jax import qat

W = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 8, 6)) * jnp.arange(1.0, 7.0)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_uniform_weights_take_at_most_2_to_the_bits_values_per_channel(bits):
  q = np.asarray(qat.uniform_fake_quant(W, bits))
  for c in range(W.shape[-1]):
    values = np.unique(q[..., c])
    assert len(values) <= 2 ** bits
    # Multiples of one step: evenly spaced levels with 0 among them (Jacob et al.'s nudge).
    grid = values / np.min(np.diff(values))
    np.testing.assert_allclose(grid, np.round(grid), atol=2e-3)
  error = np.abs(q - np.asarray(W)).max(axis=(0, 1, 2))
  span = np.asarray(jnp.maximum(W.max((0, 1, 2)), 0) - jnp.minimum(W.min((0, 1, 2)), 0))
  assert np.all(error <= span / (2 ** bits - 1) * 0.5 + 1e-6)  # round to nearest
  book = qat.uniform_codebook(W, bits)
  assert book.codebook.shape == (6, 2 ** bits)
  np.testing.assert_array_equal(np.asarray(book.dequantize()), q)  # what training saw is stored
  tensor = qat.uniform_codebook(W, bits, per_channel=False)
  assert tensor.codebook.shape == (1, 2 ** bits)
  np.testing.assert_array_equal(np.asarray(tensor.dequantize()),
                                np.asarray(qat.uniform_fake_quant(W, bits, per_channel=False)))


def test_straight_through_gradients_and_binary_values():
  g = jax.grad(lambda w: jnp.sum(qat.uniform_fake_quant(w, 2) * jnp.arange(6.0)))(W)
  np.testing.assert_array_equal(np.asarray(g), np.broadcast_to(np.arange(6.0), W.shape))
  b = np.asarray(qat.binary_fake_quant(W))
  scale = float(jnp.mean(jnp.abs(W)))
  np.testing.assert_allclose(np.unique(np.abs(b)), [scale], rtol=1e-6)
  np.testing.assert_array_equal(np.sign(b), np.where(np.asarray(W) >= 0, 1, -1))
  g = jax.grad(lambda w: jnp.sum(qat.binary_fake_quant(w) * 2.0))(W)
  assert np.all(np.asarray(g) == 2.0)
  np.testing.assert_array_equal(np.asarray(qat.binary_codebook(W).dequantize()), b)


def test_folded_batchnorm_kernel_is_quantized(tmp_path):
  fold = qat.batchnorm_scale(jnp.linspace(0.5, 2.0, 6), jnp.linspace(0.1, 1.0, 6))
  q = np.asarray(qat.uniform_fake_quant(W, 3, fold_scale=fold)) * np.asarray(fold)
  assert all(len(np.unique(np.round(q[..., c], 5))) <= 8 for c in range(6))
  params = {"conv": {"kernel": W, "bias": jnp.ones(6)}, "dense": {"kernel": W[0, 0]}}
  stored = qat.uniform_codebooks(params, 4, fold_scales={"conv/kernel": fold})
  assert gkq.is_clustered(stored["conv"]["kernel"]) and not gkq.is_clustered(stored["conv"]["bias"])
  gkq.save(tmp_path / "qat.gkq", stored)
  loaded = gkq.dequantize(gkq.load(tmp_path / "qat.gkq"))
  fake = qat.fake_quantize(params, 4, fold_scales={"conv/kernel": fold})
  for path in ("conv", "dense"):
    np.testing.assert_array_equal(np.asarray(loaded[path]["kernel"]),
                                  np.asarray(fake[path]["kernel"]))
  binary = gkq.dequantize(qat.binary_codebooks(params))
  np.testing.assert_array_equal(np.asarray(binary["dense"]["kernel"]),
                                np.asarray(qat.fake_binarize(params)["dense"]["kernel"]))


def test_bad_bits_and_patterns_raise():
  for bits in (0, 17, 2.0):
    with pytest.raises(ValueError, match="bits must be an int in 1..16"):
      qat.uniform_fake_quant(W, bits)
  with pytest.raises(ValueError, match="selects no parameter"):
    qat.fake_quantize({"w": W}, 4)
  with pytest.raises(ValueError, match="one entry per output channel"):
    qat.uniform_fake_quant(W, 4, fold_scale=jnp.ones(5))
