"""The Pallas lookup-table matmul (gkq_jax.lut_kernel), in interpret mode on CPU."""

import jax.numpy as jnp
import numpy as np
import pytest

import gkq_jax as gkq


def _weight(rng, rows, cols, bits, groups, clusters=None):
  """A packed (rows, cols) kernel with ``groups`` codebooks and its dense value."""
  idx = rng.integers(0, clusters or 2 ** bits, (rows, cols)).astype(np.uint8)
  book = rng.standard_normal((groups, clusters or 2 ** bits)).astype(np.float32)
  dense = book[(np.arange(cols) // (cols // groups))[None, :], idx]
  return gkq.pack(gkq.ClusteredArray(jnp.asarray(book), jnp.asarray(idx)), bits), dense


CASES = [  # batch, rows, channels, bits, codebooks, clusters
    (3, 256, 32, 4, 32, None),  # per channel, 4 bits
    (1, 128, 16, 3, 1, 6),  # one codebook per layer, 6 of 8 slots used
    (17, 250, 48, 2, 3, None),  # groups of 16 channels, rows padded to words, batch > a tile
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}bit-{c[4]}books")
def test_kernel_equals_dequantize_then_dot(case):
  m, rows, cols, bits, groups, clusters = case
  rng = np.random.default_rng(rows + bits)
  w, dense = _weight(rng, rows, cols, bits, groups, clusters)
  x = rng.standard_normal((m, rows)).astype(np.float32)
  y = gkq.lut_matmul(x, w, interpret=True)
  np.testing.assert_allclose(np.asarray(y), x @ dense, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(gkq.lut_matmul_reference(x, w)), x @ dense,
                             rtol=1e-5, atol=1e-4)


def test_gather_lookup_with_bf16_inputs_split_k_leading_axes_and_one_bit():
  rng = np.random.default_rng(0)
  w, dense = _weight(rng, 512, 32, 1, 32)
  x = rng.standard_normal((2, 3, 512)).astype(np.float32)
  xb = jnp.asarray(x, jnp.bfloat16)
  # 4 K-splits of 16 words: the partial sums of the splits are added after the call.
  y = gkq.lut_matmul(xb, w, interpret=True, block_n=16, block_words=16, splits=4,
                     lookup="gather")
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 3, 32)
  ref = np.asarray(xb, np.float32) @ np.asarray(jnp.asarray(dense, jnp.bfloat16), np.float32)
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2, atol=0.3)


def test_unsupported_weights_are_clear_errors():
  rng = np.random.default_rng(1)
  w, _ = _weight(rng, 100, 32, 4, 32)
  assert "multiple of 16 words" in gkq.lut_unsupported(w)
  with pytest.raises(ValueError, match="lut_matmul cannot run this weight: 100 input rows"):
    gkq.lut_matmul(np.ones((1, 100), np.float32), w)
  five, _ = _weight(rng, 128, 16, 5, 16)
  assert "5-bit" in gkq.lut_unsupported(five)
  ok, _ = _weight(rng, 128, 16, 2, 16)
  with pytest.raises(ValueError, match="x has 64 features, the weight 128"):
    gkq.lut_matmul(np.ones((1, 64), np.float32), ok)
  with pytest.raises(ValueError, match="bfloat16 or float32"):
    gkq.lut_matmul(np.ones((1, 128), np.int32), ok)
  with pytest.raises(ValueError, match="block_n=24 must divide 16"):
    gkq.lut_matmul(np.ones((1, 128), np.float32), ok, block_n=24)
  with pytest.raises(ValueError, match="lookup='table' is not one of"):
    gkq.lut_matmul(np.ones((1, 128), np.float32), ok, lookup="table")
