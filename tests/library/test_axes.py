"""Which axes are a layer's outputs and which stack layers (gkq_jax.axes, issue 26):
per-channel codebooks per output feature of DenseGeneral / LinearGeneral kernels,
and nn.scan stacks clustered layer by layer, run from packed weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gkq_jax as gkq

RULES = [gkq.bits_rule("kernel", 3)]


class Attention(nn.Module):
  heads: int = 4
  head_dim: int = 16

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((self.heads, self.head_dim), name="q")(x)
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="o")(q)


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_dense_general_gets_a_codebook_per_output_feature():
  x = jnp.ones((2, 64))
  axes = gkq.layer_axes(Attention(), x)
  assert axes["q/kernel"] == gkq.LeafAxes(stacked=0, channels=2)
  assert axes["o/kernel"] == gkq.LeafAxes(stacked=0, channels=1)
  params = {"q": {"kernel": _normal((64, 4, 16))}, "o": {"kernel": _normal((4, 16, 64), 1)}}
  q = gkq.quantize(params, None, RULES, granularity="channel", axes=axes)
  assert q["q"]["kernel"].codebook.shape == (64, 8)  # heads x head_dim tables, not head_dim
  assert q["o"]["kernel"].codebook.shape == (64, 8)  # d tables, each over heads x head_dim
  # The same projection written as Dense(64): the same tables, bit for bit.
  as_dense = gkq.quantize({"k": params["q"]["kernel"].reshape(64, 64)}, None,
                          [gkq.bits_rule("k", 3)], granularity="channel")
  np.testing.assert_array_equal(as_dense["k"].codebook, q["q"]["kernel"].codebook)
  np.testing.assert_array_equal(gkq.dequantize(as_dense)["k"].reshape(64, 4, 16),
                                gkq.dequantize(q)["q"]["kernel"])
  # Without the axes, the last axis only (the old reading); a rule can say it too.
  assert gkq.quantize(params, None, RULES, granularity="channel")["q"]["kernel"].codebook.shape \
      == (16, 8)
  by_rule = gkq.quantize(params, None, [gkq.bits_rule("q/kernel", 3, channel_axes=2),
                                        gkq.bits_rule("kernel", 3)], granularity="channel")
  np.testing.assert_array_equal(by_rule["q"]["kernel"].codebook, q["q"]["kernel"].codebook)
  # Under a "params" level, and run from packed weights.
  q2 = gkq.quantize({"params": params}, None, RULES, granularity="channel", axes=axes)
  assert q2["params"]["q"]["kernel"].codebook.shape == (64, 8)
  biases = {"q": {"bias": jnp.zeros((4, 16))}, "o": {"bias": jnp.zeros(64)}}
  with_biases = lambda tree: {n: {**tree[n], **biases[n]} for n in tree}  # noqa: E731
  x = _normal((3, 64), 2)
  dense = Attention().apply({"params": with_biases(gkq.dequantize(q))}, x)
  packed = gkq.apply_packed(Attention(), {"params": with_biases(gkq.pack_tree(q))}, x,
                            kernel="xla")
  np.testing.assert_allclose(packed, dense, rtol=1e-6, atol=1e-6)


def test_a_channel_count_that_is_no_trailing_product_is_an_error():
  params = {"kernel": _normal((6, 4, 5))}
  with pytest.raises(ValueError, match=r"kernel: 2 stacked and 2 channel axes do not fit its "
                                       r"shape \(6, 4, 5\)"):
    gkq.quantize(params, None, [gkq.ClusterRule("kernel", 4, channel_axes=2, stacked_axes=2)],
                 granularity="channel")
  bad = gkq.ClusteredArray(jnp.zeros((3, 4)), jnp.zeros((6, 4, 5), jnp.uint8))
  with pytest.raises(ValueError, match=r"a codebook of 3 channels does not match the trailing "
                                       r"axes of a weight of shape \(6, 4, 5\)"):
    bad.dequantize()
  with pytest.raises(ValueError, match="channel_axes must be None or an integer >= 1"):
    gkq.ClusterRule("kernel", 4, channel_axes=0)


class NnxAttention(nnx.Module):
  def __init__(self, rngs):
    self.q = nnx.LinearGeneral(64, (4, 16), rngs=rngs)
    self.o = nnx.LinearGeneral((4, 16), 64, axis=(-2, -1), rngs=rngs)

  def __call__(self, x):
    return self.o(self.q(x))


def test_linear_general_gets_a_codebook_per_output_feature():
  model = NnxAttention(nnx.Rngs(0))
  axes = gkq.layer_axes(model)
  assert axes["q/kernel"].channels == 2 and axes["o/kernel"].channels == 1
  state = nnx.state(model, nnx.Param)
  q = gkq.quantize(state, None, RULES, granularity="channel", axes=axes)
  assert q["q"]["kernel"].get_value().codebook.shape == (64, 8)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  x = _normal((2, 64), 3)
  dense = nnx.merge(graphdef, gkq.dequantize(q), rest)(x)
  packed = gkq.merge_packed(graphdef, gkq.pack_tree(q), rest, kernel="xla")(x)
  np.testing.assert_allclose(packed, dense, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------ stacked layers


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.DenseGeneral((4, 8), name="q")(x)
    h = nn.DenseGeneral(32, axis=(-2, -1), name="o")(nn.relu(h))
    return x + nn.Dense(32, name="up")(h), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return stack(name="layers")(x, None)[0]


class Unscanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = Block(name=f"layers_{i}")(x, None)[0]
    return x


@pytest.fixture(scope="module")
def twins():
  x = _normal((2, 32), 4)
  scanned = jax.jit(Scanned().init)(jax.random.PRNGKey(0), x)["params"]
  unscanned = {f"layers_{i}": jax.tree.map(lambda a: a[i], scanned["layers"]) for i in range(3)}
  return x, scanned, unscanned


@pytest.mark.parametrize("granularity,group_size", [("layer", None), ("channel", None),
                                                    ("channel", 16)])
def test_a_scanned_stack_is_clustered_and_run_as_its_unscanned_twin(twins, granularity,
                                                                    group_size, tmp_path):
  x, scanned, unscanned = twins
  axes = gkq.layer_axes(Scanned(), x)
  assert axes["layers/q/kernel"] == gkq.LeafAxes(stacked=1, channels=2)
  assert axes["layers/up/bias"].stacked == 1
  options = dict(granularity=granularity, group_size=group_size)
  sq = gkq.quantize(scanned, None, RULES, axes=axes, **options)
  uq = gkq.quantize(unscanned, None, RULES, axes=gkq.layer_axes(Unscanned(), x), **options)
  sd, ud = gkq.dequantize(sq), gkq.dequantize(uq)
  for i in range(3):
    for name in ("q", "o", "up"):
      np.testing.assert_array_equal(sd["layers"][name]["kernel"][i],
                                    ud[f"layers_{i}"][name]["kernel"])
  # Run from packed weights, each step dequantizing its own slice.
  packed = gkq.pack_tree(sq)
  assert packed["layers"]["q"]["kernel"].stacked == 1
  y = jax.jit(lambda p, x: gkq.apply_packed(Scanned(), {"params": p}, x, kernel="xla"))(packed, x)
  np.testing.assert_allclose(y, Unscanned().apply({"params": ud}, x), rtol=1e-6, atol=1e-6)
  # The file keeps the stack.
  gkq.save(tmp_path / "stack.gkq", sq)
  back = gkq.load(tmp_path / "stack.gkq")
  assert back["layers"]["q"]["kernel"].stacked == 1
  np.testing.assert_array_equal(gkq.dequantize(back)["layers"]["q"]["kernel"],
                                sd["layers"]["q"]["kernel"])


def test_a_stack_clustered_as_one_array_is_refused_by_the_packed_runtime(twins):
  x, scanned, _ = twins
  packed = gkq.pack_tree(gkq.quantize(scanned, None, RULES))
  with pytest.raises(ValueError, match=r"params/layers/\w+/kernel is split by nn.scan / nn.vmap "
                                       r"but it was clustered as one array"):
    gkq.apply_packed(Scanned(), {"params": packed}, x, kernel="xla")
  y = gkq.apply_packed(Scanned(), {"params": packed}, x, kernel="xla", dense=("layers/",))
  expected = Scanned().apply({"params": gkq.dequantize(gkq.unpack_tree(packed))}, x)
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_stacked_layers_stay_shared_under_fine_tuning(twins):
  x, scanned, _ = twins
  sq = gkq.quantize(scanned, None, RULES, granularity="channel",
                    axes=gkq.layer_axes(Scanned(), x))
  params = gkq.dequantize(sq)
  tx = optax.chain(optax.adam(0.01), gkq.share_centroids(sq))
  state = tx.init(params)
  loss = lambda p: jnp.sum(Scanned().apply({"params": p}, x) ** 2)  # noqa: E731
  for _ in range(3):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  kernel = np.asarray(params["layers"]["q"]["kernel"]).reshape(3, 32, 32)
  assert max(len(np.unique(kernel[i, :, c])) for i in range(3) for c in range(32)) <= 8
  refreshed = gkq.refresh_codebooks(sq, params)
  np.testing.assert_array_equal(gkq.dequantize(refreshed)["layers"]["q"]["kernel"],
                                params["layers"]["q"]["kernel"])


class NnxStack(nnx.Module):
  """Three Linear layers made by nnx.vmap and run by nnx.scan."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Linear(8, 8, rngs=rngs)

    self.layers = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def step(x, layer):
      return jnp.tanh(layer(x))

    return step(x, self.layers)


def test_nnx_stacked_layers_are_read_off_the_module_and_run_packed():
  model = NnxStack(nnx.Rngs(0))
  axes = gkq.layer_axes(model)
  assert axes["layers/kernel"] == gkq.LeafAxes(stacked=1, channels=1)
  graphdef, state = nnx.split(model)
  q = gkq.quantize(state, None, RULES, granularity="channel", axes=axes)
  assert q["layers"]["kernel"].get_value().codebook.shape == (3, 8, 8)
  x = _normal((2, 8), 5)
  run = nnx.jit(lambda m, x: m(x))
  np.testing.assert_allclose(run(gkq.merge_packed(graphdef, gkq.pack_tree(q), kernel="xla"), x),
                             run(nnx.merge(graphdef, gkq.dequantize(q)), x), rtol=1e-6, atol=1e-6)
