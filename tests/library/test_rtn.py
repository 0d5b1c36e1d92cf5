"""Round-to-nearest uniform quantization (gkq_jax.rtn), the tables' baseline."""

import jax.numpy as jnp
import numpy as np
import pytest

import gkq_jax as gkq
from gkq_jax import rtn

W = np.random.default_rng(0).standard_t(4, (64, 6)).astype(np.float32)  # heavy tails


def _numpy_rtn(w, bits):
  """Asymmetric min-max RTN per column with an integer zero point (GPTQ's quantizer),
  written out."""
  lo, hi = np.minimum(w.min(0), 0), np.maximum(w.max(0), 0)
  step = (hi - lo) / (2 ** bits - 1)
  zero = np.round(-lo / step)
  return step * (np.clip(np.round(w / step) + zero, 0, 2 ** bits - 1) - zero)


def test_minmax_per_channel_is_the_textbook_quantizer():
  q = rtn.rtn_array(W, 3)
  assert q.codebook.shape == (6, 8)
  np.testing.assert_allclose(q.dequantize(), _numpy_rtn(W, 3), rtol=1e-5, atol=1e-6)
  book = np.asarray(q.codebook)
  step = (book[:, -1] - book[:, 0]) / 7
  assert np.all(np.abs(book[:, 0] - W.min(0)) <= step / 2 + 1e-6)
  assert np.all(np.abs(book[:, -1] - W.max(0)) <= step / 2 + 1e-6)
  # 0 is a level, so the file stores each row as two numbers (scale and offset).
  assert np.all((book == 0).any(axis=1))
  table = gkq.quantize({"w": jnp.asarray(W)}, None, [gkq.bits_rule("w", 3)],
                       granularity="channel")["w"]  # the same layout with a float table
  assert gkq.stored_bytes(q) < gkq.stored_bytes(table) - 0.8 * book.size * 4


def test_mse_clipping_never_loses_to_minmax_and_wins_on_heavy_tails():
  err = lambda q: np.sum((np.asarray(q.dequantize()) - W) ** 2, axis=0)
  minmax, mse = err(rtn.rtn_array(W, 3)), err(rtn.rtn_array(W, 3, clip="mse"))
  assert np.all(mse <= minmax + 1e-6) and mse.sum() < 0.9 * minmax.sum()


def test_groups_stacks_and_whole_trees():
  q = rtn.rtn_array(W, 2, group_size=16)
  assert q.codebook.shape == (4, 6, 4)
  for r in range(4):
    np.testing.assert_allclose(np.asarray(q.dequantize())[16 * r:16 * (r + 1)],
                               _numpy_rtn(W[16 * r:16 * (r + 1)], 2), rtol=1e-5, atol=1e-6)
  stack = np.stack([W, 2 * W])
  s = rtn.rtn_array(stack, 3, axes=gkq.LeafAxes(stacked=1))
  np.testing.assert_allclose(np.asarray(s.dequantize())[1], _numpy_rtn(2 * W, 3), rtol=1e-5,
                             atol=1e-5)
  tree = gkq.rtn_quantize({"dense": {"kernel": W, "bias": jnp.ones(6)}}, 4)
  assert gkq.is_clustered(tree["dense"]["kernel"]) and not gkq.is_clustered(tree["dense"]["bias"])
  with pytest.raises(ValueError, match=r"group_size=5 must divide the 64 input rows"):
    rtn.rtn_array(W, 2, group_size=5)
  with pytest.raises(ValueError, match="clip='max' is not one of"):
    rtn.rtn_array(W, 2, clip="max")
