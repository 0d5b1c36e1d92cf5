"""Per-channel clustering of LLM-sized matrices in chunks (gkq_jax.channels)."""

import numpy as np
import pytest

import gkq_jax as gkq


@pytest.fixture(scope="module")
def matrix():
  """A reduced transformer matrix: 64 inputs, 10 output channels, heavy-tailed weights."""
  rng = np.random.default_rng(0)
  w = (rng.standard_t(5, (64, 10)) * 0.02).astype(np.float32)
  h = rng.exponential(1.0, (64, 10)).astype(np.float32) ** 2  # Fisher-like: positive, skewed
  return w, h


def test_chunked_channels_match_grouped_kmeans_on_the_same_rows(matrix):
  w, h = matrix
  # 3 channels per call: 4 calls, the last padded with copies of its last channel.
  got = gkq.cluster_per_channel(w, h, 8, chunk_values=3 * 64)
  assert got.indices.dtype == np.uint8 and got.codebook.shape == (10, 8)
  assert got.indices.shape == w.shape
  for channels in ([0, 1, 2], [4, 7, 9]):  # the same rows, grouped as the chunks are
    ref = gkq.grouped_kmeans_1d(w[:, channels].T.reshape(-1), h[:, channels].T.reshape(-1),
                                (64,) * 3, 8)
    np.testing.assert_array_equal(np.asarray(got.codebook)[channels],
                                  np.asarray(ref.centroids))
    np.testing.assert_array_equal(np.asarray(got.indices)[:, channels],
                                  np.asarray(ref.assignments).reshape(3, 64).T)
  # Channel n of the dense result is codebook row n at the indices: granularity="channel".
  dense, book, idx = (np.asarray(a) for a in (got.dequantize(), got.codebook, got.indices))
  np.testing.assert_array_equal(dense[:, 5], book[5][idx[:, 5]])


def test_stream_takes_matrices_one_at_a_time(matrix):
  w, h = matrix
  pulled = []

  def layers():
    for name, (a, b) in (("q", (w, h)), ("down", (w[:, :4], h[:, :4]))):
      pulled.append(name)
      yield name, a, b

  # The chunk shape of the test above: no new compilation.
  stream = gkq.stream_per_channel(layers(), 8, chunk_values=3 * 64)
  name, first = next(stream)
  assert name == "q" and pulled == ["q"]  # the second matrix is not loaded yet
  name, second = next(stream)
  assert name == "down" and second.indices.shape == (64, 4) and pulled == ["q", "down"]
  np.testing.assert_array_equal(np.asarray(second.codebook), np.asarray(first.codebook)[:4])


def test_bad_input_names_the_matrix(matrix):
  w, h = matrix
  with pytest.raises(ValueError, match="up: importance has shape"):
    gkq.cluster_per_channel(w, h[:3], 4, name="up")
  with pytest.raises(ValueError, match="up: weight must have at least 2 axes"):
    gkq.cluster_per_channel(w[:, 0], None, 4, name="up")
  with pytest.raises(ValueError, match=r"takes \(name, weight, importance\) triples"):
    next(gkq.stream_per_channel([w], 4))
