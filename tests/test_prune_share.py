import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gkq_jax as gkq
from gkq_jax import models, prune, share


def test_share_centroids_mean_and_sum():
  params = {"w": jnp.array([[0.0, 1.0], [1.0, 3.0]])}
  q = gkq.quantize(params, None, [gkq.ClusterRule("w", 3)])
  grads = {"w": jnp.array([[1.0, 2.0], [4.0, 8.0]])}
  for reduce, expected in (("mean", [[1.0, 3.0], [3.0, 8.0]]), ("sum", [[1.0, 6.0], [6.0, 8.0]])):
    tx = share.share_centroids(q, reduce)
    out, _ = tx.update(grads, tx.init(params))
    np.testing.assert_allclose(out["w"], expected)
  with pytest.raises(ValueError, match="reduce='median'"):
    share.share_centroids(q, "median")


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_pruned_clustered_training_keeps_k_values_and_zeros(granularity):
  model = models.MLP((32, 16))
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
  out, _ = tx.update(grads, tx.init(params))
  np.testing.assert_allclose(out["a"], [2.0, 2.0, 5.0])
  np.testing.assert_allclose(out["b"], grads["b"])


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
