"""Whole-model quantization (gkq_jax.quantize): linen, nnx, granularities."""

import warnings

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


def test_importance_on_one_layer_changes_that_codebook_only(linen_setup):
  params, _ = linen_setup
  importance = jax.tree.map(jnp.ones_like, params)  # all ones: plain k-means, bit for bit
  kernel = params["params"]["Dense_0"]["kernel"]
  largest = jnp.abs(kernel) > jnp.quantile(jnp.abs(kernel), 0.9)
  importance["params"]["Dense_0"]["kernel"] = jnp.where(largest, 1.0, 1e-3)
  rules = [gkq.ClusterRule(num_clusters=4)]
  plain = dict(gkq.clustered_leaves(gkq.quantize(params, None, rules)))
  focused = dict(gkq.clustered_leaves(gkq.quantize(params, importance, rules)))
  assert len(plain) == 4
  for path, leaf in plain.items():
    same = np.allclose(leaf.codebook, focused[path].codebook, rtol=1e-6, atol=1e-7)
    assert same == (path != "params/Dense_0/kernel"), path


def test_vector_granularity_keeps_every_filter_in_place(linen_setup):
  params, _ = linen_setup
  w = np.asarray(params["params"]["Conv_1"]["kernel"])  # (3, 3, 6, 5): 30 filters of 3x3
  filters = w.reshape(9, -1).T  # row i * 5 + o: the taps of filter (in i, out o)
  rule = lambda k: [gkq.ClusterRule(r"Conv_1/kernel$", k, min_ndim=3)]
  every = gkq.quantize(params, None, rule(30), granularity="vector")  # a centroid per filter
  np.testing.assert_allclose(gkq.dequantize(every)["params"]["Conv_1"]["kernel"], w, atol=1e-6)
  q = gkq.quantize(params, None, rule(5), granularity="vector")
  leaf = q["params"]["Conv_1"]["kernel"]
  book = np.asarray(leaf.codebook)
  nearest = ((filters[:, None] - book[None]) ** 2).sum(-1).argmin(1)
  np.testing.assert_array_equal(np.asarray(leaf.indices).reshape(-1), nearest)
  dense = np.asarray(gkq.dequantize(q)["params"]["Conv_1"]["kernel"])
  np.testing.assert_array_equal(dense.reshape(9, -1).T, book[nearest])


def test_combined_budget_is_split_by_layer_size(linen_setup):
  params, importance = linen_setup
  q = gkq.quantize(params, importance, [gkq.ClusterRule(num_clusters=4)],
                   granularity="combined", budget=40)
  ks = {p: c.num_clusters for p, c in gkq.clustered_leaves(q)}
  sizes = {p: c.indices.size for p, c in gkq.clustered_leaves(q)}
  total = sum(sizes.values())
  assert ks == {p: max(2, round(40 * n / total)) for p, n in sizes.items()}
  assert ks["params/Dense_1/kernel"] == 34  # 2880 of the 3418 weights


# ------------------------------------------------------------ the core claim


class ScaledInputsMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(32)(x)))


def mlp_loss(params, batch):
  logits = ScaledInputsMLP().apply(params, batch[0])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()


@pytest.fixture(scope="module")
def trained_mlp():
  """A small MLP trained on inputs of very different scales (pixels of different
  contrast): the weights of low-contrast inputs grow large but matter little,
  which plain k-means cannot know. Labels are drawn from a teacher's softmax, so
  the trained loss stays well above zero and its gradients carry information."""
  rng = np.random.default_rng(0)
  n, d = 4096, 64
  scales = np.exp(rng.uniform(np.log(0.1), np.log(3.0), d))
  x = (rng.standard_normal((n, d)) * scales).astype(np.float32)
  logits = (x / scales) @ rng.standard_normal((d, 4)) * (2.0 / np.sqrt(d))
  p = np.exp(logits - logits.max(1, keepdims=True))
  y = ((p / p.sum(1, keepdims=True)).cumsum(1) > rng.random((n, 1))).argmax(1).astype(np.int32)
  tx = optax.adam(1e-2)

  @jax.jit
  def train(params, x, y):
    def step(carry, _):
      params, state = carry
      updates, state = tx.update(jax.grad(mlp_loss)(params, (x, y)), state, params)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(step, (params, tx.init(params)), None, length=200)[0][0]

  params = train(ScaledInputsMLP().init(jax.random.PRNGKey(0), x[:1]), x, y)
  batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]
  return params, gkq.compute_importance(mlp_loss, params, batches, "grad_sq"), (x, y)


def test_gradient_weighting_beats_plain_kmeans_on_the_loss_at_2_bits(trained_mlp):
  # The product's core claim, before any fine-tuning. (Where every weight
  # matters alike, e.g. a tiny MLP on the 8x8 digits, the two are a coin flip.)
  params, importance, batch = trained_mlp
  rules = [gkq.bits_rule("kernel$", 2)]
  base = float(mlp_loss(params, batch))
  assert 0.2 < base < 0.6  # trained, not memorised

  def loss_increase(importance):
    q = gkq.quantize(params, importance, rules)
    return float(mlp_loss(gkq.dequantize(q), batch)) - base

  weighted, plain = loss_increase(importance), loss_increase(None)
  assert 0 < weighted < 0.8 * plain, (weighted, plain)


@pytest.fixture(scope="module")
def grouped_channels():
  """A Dense and a conv kernel with one codebook per 4 input rows of a channel."""
  rng = np.random.default_rng(0)
  params = {"conv": {"kernel": rng.standard_normal((3, 3, 4, 6)).astype(np.float32)},
            "dense": {"kernel": rng.standard_normal((16, 5)).astype(np.float32),
                      "bias": rng.standard_normal(5).astype(np.float32)}}
  importance = jax.tree.map(lambda a: rng.random(a.shape).astype(np.float32), params)
  rules = [gkq.ClusterRule("kernel", 4)]
  quantized = gkq.quantize(params, importance, rules, granularity="channel", group_size=4)
  return params, importance, quantized


def test_group_size_clusters_each_group_of_input_rows_alone(grouped_channels):
  params, importance, quantized = grouped_channels
  dense = gkq.dequantize(quantized)
  assert quantized["conv"]["kernel"].codebook.shape == (9, 6, 4)  # (fan_in / 4, C, K)
  assert quantized["dense"]["kernel"].codebook.shape == (4, 5, 4)
  np.testing.assert_array_equal(dense["dense"]["bias"], params["dense"]["bias"])
  for name in ("conv", "dense"):
    w = params[name]["kernel"].reshape(-1, params[name]["kernel"].shape[-1])
    h = importance[name]["kernel"].reshape(w.shape)
    got = np.asarray(dense[name]["kernel"]).reshape(w.shape)
    for row in (0, 12) if name == "dense" else (0, 32):  # first and last groups
      for channel in range(w.shape[1]):
        group = np.s_[row:row + 4, channel]
        alone = gkq.kmeans_1d(w[group], h[group], 4)
        np.testing.assert_array_equal(got[group],
                                      np.asarray(alone.centroids)[np.asarray(alone.assignments)])


def test_group_size_leaves_save_load_and_share(grouped_channels, tmp_path):
  _, _, quantized = grouped_channels
  dense = gkq.dequantize(quantized)
  gkq.save(tmp_path / "grouped.gkq", quantized)
  back = gkq.load(tmp_path / "grouped.gkq")
  assert back["conv"]["kernel"].codebook.shape == (9, 6, 4)
  jax.tree.map(np.testing.assert_array_equal, gkq.dequantize(back), dense)
  tx = gkq.share_centroids(quantized)
  grads = jax.tree.map(lambda a: jnp.sin(jnp.arange(a.size, dtype=jnp.float32)).reshape(a.shape),
                       dense)
  updates, _ = tx.update(grads, tx.init(dense), dense)
  step = np.asarray(updates["dense"]["kernel"])
  grad = np.asarray(grads["dense"]["kernel"])
  idx = np.asarray(quantized["dense"]["kernel"].indices)
  for row in range(0, 16, 4):  # each (group, cluster) moves by its own members' mean gradient
    for channel in range(5):
      group = np.s_[row:row + 4, channel]
      for k in np.unique(idx[group]):
        members = idx[group] == k
        np.testing.assert_allclose(step[group][members], grad[group][members].mean(),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_size,granularity,message", [
    (0, "channel", r"group_size must be a positive int"),
    (True, "channel", r"group_size must be a positive int"),
    (3, "channel", r"group_size=3 does not divide the 16 input rows of dense/kernel"),
    (4, "layer", r"needs granularity='channel'")])
def test_group_size_bad_input(grouped_channels, group_size, granularity, message):
  params, _, _ = grouped_channels
  with pytest.raises(ValueError, match=message):
    gkq.quantize(params, None, [gkq.ClusterRule("kernel", 4)], granularity=granularity,
                 group_size=group_size)


def test_a_clustered_leaf_with_none_importance_beside_weighted_ones_warns():
  # None is "no importance": right for leaves never clustered (an nnx count), almost always
  # a mistake for a kernel the rules cluster while its siblings are weighted (issue 25).
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": rng.standard_normal((8, 6)).astype(np.float32)},
            "b": {"kernel": rng.standard_normal((6, 4)).astype(np.float32)},
            "count": np.int32(3)}
  rules = [gkq.ClusterRule("kernel$", 4)]
  fast = dict(method="lloyd", init="linear")
  weighted = {"a": {"kernel": np.ones((8, 6), np.float32)},
              "b": {"kernel": np.ones((6, 4), np.float32)}, "count": None}
  missing = dict(weighted, b={"kernel": None})
  with pytest.warns(UserWarning, match=r"^quantize: the importance of 'b/kernel' is None but "
                                       r"the rules cluster it.*jnp\.ones_like\(leaf\)"):
    gkq.quantize(params, missing, rules, **fast)
  with pytest.warns(UserWarning, match=r"^quantize_to_budget: the importance of 'b/kernel'"):
    gkq.quantize_to_budget(params, missing, rules, 1_000, clusters=(2, 4), **fast)
  with warnings.catch_warnings():  # None only where nothing is clustered, or everywhere
    warnings.simplefilter("error")
    gkq.quantize(params, weighted, rules, **fast)
    gkq.quantize(params, None, rules, **fast)
    gkq.quantize(params, jax.tree.map(lambda _: None, weighted), rules, **fast)
