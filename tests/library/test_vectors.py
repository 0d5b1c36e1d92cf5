"""Conv kernels as vectors (gkq_jax/_vectors.py): kernel rows and filters through
quantize, share_centroids fine-tuning, refresh_codebooks and the file."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gkq_jax as gkq
from gkq_jax import _vectors


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 5))(x))  # kw = 5: rows of length 5
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def _rows(kernel, layout):
  axis, shape = _vectors.layout_of(kernel.shape, layout)
  return np.asarray(_vectors.to_points(jnp.asarray(kernel), axis, shape)[0])


@pytest.fixture(scope="module")
def trained():
  """ConvNet's conv kernels sharing 4 kernel rows each, fine-tuned 5 SGD steps."""
  model = ConvNet()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((16, 6, 6, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 16))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  k = 4
  q = gkq.quantize(params, None, [gkq.ClusterRule(r"Conv_\d+/kernel$", k)], granularity="row")
  tx = optax.chain(optax.sgd(0.5, momentum=0.9), gkq.share_centroids(q))
  p = gkq.dequantize(q)
  state = tx.init(p)

  @jax.jit
  def step(p, state):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  start = p
  for _ in range(5):
    p, state = step(p, state)
  return {"row": (q, start, p, k)}


@pytest.mark.parametrize("layout", ["row"])
def test_at_most_k_distinct_vectors_through_finetuning(trained, layout):
  q, start, tuned, k = trained[layout]
  for name in ("Conv_0", "Conv_1"):
    leaf = q[name]["kernel"]
    kernel = np.asarray(tuned[name]["kernel"])
    assert leaf.shape == kernel.shape
    assert len(np.unique(_rows(kernel, layout), axis=0)) <= k
    assert not np.array_equal(kernel, np.asarray(start[name]["kernel"]))  # it did train
  # The refreshed codebooks reproduce the tuned weights exactly, and so does the file.
  refreshed = gkq.refresh_codebooks(q, tuned)
  assert np.array_equal(np.asarray(gkq.dequantize(refreshed)["Conv_1"]["kernel"]),
                        np.asarray(tuned["Conv_1"]["kernel"]))


def test_row_layout_and_file_round_trip(trained, tmp_path):
  q, _, tuned, _ = trained["row"]
  leaf = gkq.refresh_codebooks(q, tuned)["Conv_1"]["kernel"]
  assert leaf.codebook.shape == (4, 5) and leaf.indices.shape == (3, 6, 8)
  assert leaf.vector_axis == 1 and leaf.vector_shape == (5,)
  # Every kernel row (fixed h, in, out) is one codebook row.
  dense = np.asarray(leaf.dequantize())
  book = np.asarray(leaf.codebook)
  idx = np.asarray(leaf.indices)
  assert np.array_equal(dense[2, :, 3, 7], book[idx[2, 3, 7]])
  gkq.save(tmp_path / "rows.gkq", {"Conv_1": leaf})
  loaded = gkq.load(tmp_path / "rows.gkq")["Conv_1"]
  assert loaded.vector_axis == 1
  assert np.array_equal(np.asarray(loaded.dequantize()), dense)


def test_rows_of_a_1d_conv_and_per_coordinate_importance():
  rng = np.random.default_rng(1)
  kernel = rng.standard_normal((3, 2, 4)).astype(np.float32)  # (W, in, out): rows = W
  q = gkq.quantize({"kernel": kernel}, None, [gkq.ClusterRule("kernel", 2)], granularity="row")
  assert q["kernel"].indices.shape == (2, 4) and q["kernel"].vector_shape == (3,)
  # Importance on the first coordinate only: the centroids fit that coordinate.
  h = np.zeros_like(kernel)
  h[0] = 1.0
  w = gkq.quantize({"kernel": kernel}, {"kernel": h}, [gkq.ClusterRule("kernel", 2)],
                   granularity="row")
  err = lambda leaf: np.abs(np.asarray(leaf.dequantize()) - kernel)[0].sum()
  assert err(w["kernel"]) < err(q["kernel"])


def test_rows_of_a_dense_kernel_are_an_error():
  params = {"Dense_0": {"kernel": jnp.ones((4, 3))}}
  with pytest.raises(ValueError, match=r"granularity='row' clusters the kernel rows.*Dense_0"):
    gkq.quantize(params, None, [gkq.ClusterRule("kernel", 2)], granularity="row")


def test_filters_stay_shared_under_random_updates():
  rng = np.random.default_rng(2)
  params = {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)}
  q = gkq.quantize(params, None, [gkq.ClusterRule("kernel", 3)], granularity="vector")
  leaf = q["kernel"]
  assert leaf.vector_axis == 0 and leaf.indices.shape == (4, 5)
  dense = np.asarray(leaf.dequantize())
  filter_12 = np.asarray(leaf.codebook)[leaf.indices[1, 2]].reshape(3, 3)
  assert np.array_equal(dense[:, :, 1, 2], filter_12)
  tx = gkq.share_centroids(q)
  p, state = gkq.dequantize(q), tx.init(params)
  for _ in range(2):
    noise = {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)}
    updates, state = tx.update(noise, state, p)
    p = optax.apply_updates(p, updates)
  assert len(np.unique(_rows(np.asarray(p["kernel"]), "vector"), axis=0)) <= 3
