"""Fine-tuning on shared values (gkq_jax.share), with pruning masks kept."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gkq_jax as gkq
from gkq_jax import prune, share


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(32)(x))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(10)(x)


def test_share_centroids_mean_and_sum():
  params = {"w": jnp.array([[0.0, 1.0], [1.0, 3.0]])}
  q = gkq.quantize(params, None, [gkq.ClusterRule("w", 3)])
  grads = {"w": jnp.array([[1.0, 2.0], [4.0, 8.0]])}
  for reduce, expected in (("mean", [[1.0, 3.0], [3.0, 8.0]]), ("sum", [[1.0, 6.0], [6.0, 8.0]])):
    tx = share.share_centroids(q, reduce)
    out, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(out["w"], expected)
  with pytest.raises(ValueError, match="reduce='median'"):
    share.share_centroids(q, "median")


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_pruned_clustered_training_keeps_k_values_and_zeros(granularity):
  model = MLP()
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 6, 6, 1))
  y = jnp.arange(64) % 10
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  selected = jax.tree_util.tree_map_with_path(
      lambda p, w: jax.tree_util.keystr(p).endswith("['kernel']"), params)
  masks = prune.magnitude_masks(params, selected, quality=0.8)
  params = prune.apply_masks(params, masks)
  sparsity = prune.sparsity(params, selected)
  assert 0.3 < sparsity < 0.7  # |w| < 0.8 std of a bell curve is about half
  q = gkq.quantize(params, None, [gkq.ClusterRule(num_clusters=6)], masks=masks,
                   granularity=granularity)
  params = gkq.dequantize(q)

  def loss_fn(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  tx = optax.chain(prune.keep_pruned(optax.sgd(0.1, momentum=0.9), masks),
                   share.share_centroids(q))
  state = tx.init(params)
  start = float(loss_fn(params))
  for _ in range(5):
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for layer in ("Dense_0", "Dense_1", "Dense_2"):
      w = np.asarray(params[layer]["kernel"])
      m = np.asarray(masks[layer]["kernel"])
      assert (w[~m] == 0).all()
      groups = [w] if granularity == "layer" else [w[:, c] for c in range(w.shape[1])]
      assert max(len(np.unique(g)) for g in groups) <= 6
  assert float(loss_fn(params)) < start
  refreshed = share.refresh_codebooks(q, params)
  np.testing.assert_array_equal(np.asarray(gkq.dequantize(refreshed)["Dense_1"]["kernel"]),
                                np.asarray(params["Dense_1"]["kernel"]))


def test_share_composes_with_optax_masked():
  params = {"a": jnp.array([1.0, 1.0, 2.0]), "b": jnp.array([[1.0, 1.0], [5.0, 5.0]])}
  q = gkq.quantize(params, None, [gkq.ClusterRule("a|b", 2, min_ndim=1)])
  tx = optax.masked(share.share_centroids(q), {"a": True, "b": False})
  grads = {"a": jnp.array([1.0, 3.0, 5.0]), "b": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
  out, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(out["a"], [2.0, 2.0, 5.0])
  np.testing.assert_allclose(out["b"], grads["b"])


def test_share_centroids_checks_param_shapes_at_init():
  q = gkq.quantize({"w": jnp.array([[0.0, 1.0], [1.0, 3.0]])}, None, [gkq.ClusterRule("w", 3)])
  tx = share.share_centroids(q)
  with pytest.raises(ValueError, match=r"params at 'w' have shape \(2, 3\).*\(2, 2\)"):
    tx.init({"w": jnp.zeros((2, 3))})


def test_refresh_codebooks_averages_weights_that_left_their_values():
  params = {"w": jnp.array([[0.0, 1.0], [1.0, 3.0]])}
  q = gkq.quantize(params, None, [gkq.ClusterRule("w", 3)])
  moved = {"w": jnp.array([[0.0, 1.5], [0.5, 3.0]])}  # trained without share_centroids
  with pytest.warns(UserWarning, match=r"2 weight\(s\) in 1 cluster\(s\) of 'w' were off"):
    refreshed = share.refresh_codebooks(q, moved)
  np.testing.assert_allclose(gkq.dequantize(refreshed)["w"], [[0.0, 1.0], [1.0, 3.0]])
  kept = {"w": jnp.array([[0.25, 1.5], [1.5, 3.0]])}  # moved together: read back exactly
  np.testing.assert_array_equal(gkq.dequantize(share.refresh_codebooks(q, kept))["w"], kept["w"])


def test_refresh_codebooks_warns_how_far_weights_were_from_what_they_now_decode_to():
  # A step without share_centroids / keep_pruned: the pruned weights all moved by the same
  # amount, so their cluster agrees with itself, but its value is pinned at zero (issue 25).
  w = jnp.array([[0.0, 1.0, 0.0], [3.0, 0.0, 3.0]])
  q = gkq.quantize({"w": w}, None, [gkq.ClusterRule("w", 3)], masks={"w": w != 0})
  moved = {"w": w.at[0, 0].set(0.5).at[0, 2].set(0.5).at[1, 1].set(0.5)}
  match = (r"^refresh_codebooks: 3 weight\(s\) in 1 cluster\(s\) of 'w' were off their "
           r"shared values, by up to 0\.5, 16\.67% of the largest \|weight\|;.*share_centroids")
  with pytest.warns(UserWarning, match=match):
    refreshed = share.refresh_codebooks(q, moved)
  np.testing.assert_array_equal(gkq.dequantize(refreshed)["w"], w)  # the pinned zero holds
  with pytest.warns(UserWarning, match=match):  # under jit too
    jax.block_until_ready(jax.jit(share.refresh_codebooks)(q, moved))
  with warnings.catch_warnings():  # weights on their values: nothing to say
    warnings.simplefilter("error")
    share.refresh_codebooks(q, {"w": w})


def test_gradients_with_respect_to_codebooks():
  w = jnp.array([[0.0, 1.0, 1.0], [3.0, 0.0, 3.0]])
  masks = {"w": w != 0, "b": jnp.ones(2, bool)}
  q = gkq.quantize({"w": w, "b": jnp.ones(2)}, None, [gkq.ClusterRule("w", 3)], masks=masks)
  trainable = share.codebook_params(q)  # codebooks where clustered, other leaves as they are
  assert trainable["w"].shape == q["w"].codebook.shape

  def loss(trainable, x):
    p = gkq.dequantize(share.replace_codebooks(q, trainable))
    return jnp.sum(x @ p["w"]) + jnp.sum(p["b"])

  grads = jax.jit(jax.grad(loss))(trainable, jnp.ones((1, 2)))
  # d/dc of sum(w): number of members of each cluster; the pinned zero never moves.
  np.testing.assert_allclose(grads["w"], [[0.0, 2.0, 2.0]])
  np.testing.assert_allclose(grads["b"], [1.0, 1.0])
  stepped = jax.tree.map(lambda p, g: p - 0.1 * g, trainable, grads)
  dense = gkq.dequantize(share.replace_codebooks(q, stepped))["w"]
  np.testing.assert_allclose(dense, [[0.0, 0.8, 0.8], [2.8, 0.0, 2.8]], rtol=1e-6)
