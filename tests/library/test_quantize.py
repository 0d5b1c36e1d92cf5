"""Whole-model quantization (gkq_jax.quantize): linen, nnx, granularities."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gkq_jax as gkq
from gkq_jax import kmeans1d


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = nn.relu(nn.Conv(5, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10)(nn.relu(nn.Dense(16)(x)))


@pytest.fixture(scope="module")
def linen_setup():
  model = SmallCNN()
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 6, 6, 2))
  y = jnp.arange(8) % 10
  params = model.init(jax.random.PRNGKey(0), x)

  def loss_fn(p, batch):
    logits = model.apply(p, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  importance = gkq.compute_importance(loss_fn, params, [(x, y)], "grad_sq")
  return params, importance


def distinct_per_group(clustered, values):
  """Distinct values per codebook row (per channel when there are several)."""
  values = np.asarray(values)
  if clustered.codebook.shape[0] == 1:
    return [len(np.unique(values))]
  return [len(np.unique(values[..., c])) for c in range(values.shape[-1])]


@pytest.mark.parametrize("granularity", ["layer", "channel", "model", "combined"])
def test_every_group_has_at_most_k_values(linen_setup, granularity):
  params, importance = linen_setup
  q = gkq.quantize(params, importance, [gkq.ClusterRule(num_clusters=4)],
                   granularity=granularity)
  dense = gkq.dequantize(q)
  assert jax.tree.structure(dense) == jax.tree.structure(params)
  for path, c in gkq.clustered_leaves(q):
    assert c.indices.dtype == jnp.uint8
    value = dense
    for key in path.split("/"):
      value = value[key]
    assert value.shape == c.shape
    assert max(distinct_per_group(c, value)) <= c.num_clusters
    if granularity != "combined":
      assert c.num_clusters == 4
  # Biases stay exactly as they were.
  np.testing.assert_array_equal(dense["params"]["Dense_0"]["bias"],
                                params["params"]["Dense_0"]["bias"])
  if granularity == "model":
    books = [np.asarray(c.codebook) for _, c in gkq.clustered_leaves(q)]
    assert all(np.array_equal(books[0], b) for b in books)
  if granularity == "combined":
    ks = {p: c.num_clusters for p, c in gkq.clustered_leaves(q)}
    assert ks["params/Dense_1/kernel"] > ks["params/Conv_0/kernel"]  # bigger layer, more


def test_quantize_is_one_compiled_call_and_close_to_weights(linen_setup):
  params, importance = linen_setup
  before = kmeans1d._grouped_kmeans._cache_size()
  q = gkq.quantize(params, importance, [gkq.ClusterRule(num_clusters=32)])
  assert kmeans1d._grouped_kmeans._cache_size() == before + 1
  assert len(gkq.clustered_leaves(q)) == 4
  dense = gkq.dequantize(q)
  w = params["params"]["Dense_0"]["kernel"]
  err = float(jnp.abs(dense["params"]["Dense_0"]["kernel"] - w).max())
  assert err < 0.1 * float(jnp.abs(w).max())




def test_vector_granularity_clusters_spatial_filters(linen_setup):
  params, importance = linen_setup
  q = gkq.quantize(params, importance, [gkq.ClusterRule(r"Conv_\d/kernel$", 5, min_ndim=3)],
                   granularity="vector")
  c = q["params"]["Conv_1"]["kernel"]
  assert c.codebook.shape == (5, 9) and c.indices.shape == (6, 5)
  dense = gkq.dequantize(q)["params"]["Conv_1"]["kernel"]
  filters = np.asarray(dense).reshape(9, -1).T
  assert len(np.unique(filters, axis=0)) <= 5
  with pytest.raises(ValueError, match="spatial filters"):
    gkq.quantize(params, None, [gkq.ClusterRule(num_clusters=4)], granularity="vector")


def test_nnx_split_quantize_merge():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(12, 16, rngs=rngs)
      self.norm = nnx.BatchNorm(16, rngs=rngs)
      self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.norm(self.hidden(x))))

  model = Net(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  q = gkq.quantize(state, None, [gkq.ClusterRule(num_clusters=3)])
  assert {p for p, _ in gkq.clustered_leaves(q)} == {"hidden/kernel", "out/kernel"}
  merged = nnx.merge(graphdef, gkq.dequantize(q))
  assert len(np.unique(np.asarray(merged.hidden.kernel[...]))) <= 3
  np.testing.assert_array_equal(merged.hidden.bias[...], model.hidden.bias[...])
  merged.eval()
  assert merged(jnp.ones((2, 12))).shape == (2, 3)


@pytest.mark.parametrize("case", ["no_match", "bad_granularity", "bits", "importance_tree"])
def test_quantize_bad_input(linen_setup, case):
  params, importance = linen_setup
  if case == "no_match":
    with pytest.raises(ValueError, match=r"rule 'Cnov' matches no parameter"):
      gkq.quantize(params, None, [gkq.ClusterRule("Cnov", 4)])
  elif case == "bad_granularity":
    with pytest.raises(ValueError, match="granularity='row'"):
      gkq.quantize(params, None, granularity="row")
  elif case == "bits":
    with pytest.raises(ValueError, match="bits must be in 1..16"):
      gkq.bits_rule("kernel", 17)
  else:
    with pytest.raises(ValueError, match="same tree structure"):
      gkq.quantize(params, {"params": {}}, [gkq.ClusterRule(num_clusters=4)])


def test_clustered_tree_is_jit_friendly(linen_setup):
  params, importance = linen_setup
  q = gkq.quantize(params, importance, [gkq.ClusterRule(num_clusters=4)])
  x = jnp.ones((2, 6, 6, 2))
  logits = jax.jit(lambda q, x: SmallCNN().apply(gkq.dequantize(q), x))(q, x)
  np.testing.assert_allclose(logits, SmallCNN().apply(gkq.dequantize(q), x), rtol=1e-5, atol=1e-6)


def test_dequantize_keeps_each_leafs_dtype_and_skips_integers():
  w = jax.random.normal(jax.random.PRNGKey(0), (8, 6))
  params = {"bf16": {"kernel": w.astype(jnp.bfloat16)}, "f16": {"kernel": w.astype(jnp.float16)},
            "int": {"kernel": jnp.arange(48, dtype=jnp.int32).reshape(8, 6)}}
  q = gkq.quantize(params, None, [gkq.ClusterRule(num_clusters=4)])
  assert not gkq.is_clustered(q["int"]["kernel"])  # integer leaves are not clustered
  for name, dtype in (("bf16", jnp.bfloat16), ("f16", jnp.float16)):
    c = q[name]["kernel"]
    assert c.codebook.dtype == jnp.float32 and c.dtype == dtype
    dense = gkq.dequantize(q)[name]["kernel"]
    assert dense.dtype == dtype and len(np.unique(np.asarray(dense, np.float32))) <= 4
  jitted = jax.jit(gkq.dequantize)(q)
  assert jitted["bf16"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("case", ["scalar_channel", "empty", "nan_weight", "nan_importance"])
def test_quantize_names_the_parameter_at_fault(case):
  w = np.linspace(-1, 1, 20, dtype=np.float32).reshape(4, 5)
  params, importance = {"ok": {"kernel": w}, "bad": {"kernel": w.copy()}}, None
  kwargs = {}
  if case == "scalar_channel":
    params["bad"]["kernel"] = np.float32(0.5)
    rules, kwargs = [gkq.ClusterRule("kernel", 4, min_ndim=0)], {"granularity": "channel"}
    match = r"bad/kernel is 0-d.*min_ndim=1"
  elif case == "empty":
    params["bad"]["kernel"] = np.zeros((0, 5), np.float32)
    rules, match = [gkq.ClusterRule("kernel", 4)], r"bad/kernel has no elements \(shape \(0, 5\)\)"
  elif case == "nan_weight":
    params["bad"]["kernel"][2, 3] = np.nan
    rules, match = [gkq.ClusterRule("kernel", 4)], r"bad/kernel has 1 non-finite.*\(2, 3\)"
  else:
    importance = jax.tree.map(np.ones_like, params)
    importance["bad"]["kernel"][1, 0] = np.inf
    rules, match = ([gkq.ClusterRule("kernel", 4)],
                    r"importance of bad/kernel has 1 non-finite.*\(1, 0\)")
  with pytest.raises(ValueError, match=match):
    gkq.quantize(params, importance, rules, **kwargs)
