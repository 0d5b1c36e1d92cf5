"""Models run straight from packed weights (gkq_jax.flax_runtime), linen and nnx."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gkq_jax as gkq
from gkq_jax.job.models import MLP, LeNet5, ResNetTiny


def cheap_quantize(tree, bits=3, granularity="layer"):
  """Every matrix on a uniform grid of 2**bits values (per layer or per channel): real
  ClusteredArrays without the cost of k-means, which the runtime does not care about."""
  k = 2 ** bits

  def one(w):
    if jnp.ndim(w) < 2:
      return w
    flat = w.reshape(-1, w.shape[-1]) if granularity == "channel" else w.reshape(-1, 1)
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    book = (lo[:, None] + (hi - lo)[:, None] * jnp.linspace(0.0, 1.0, k)[None, :])
    idx = jnp.rint((w - lo) / jnp.where(hi > lo, hi - lo, 1.0) * (k - 1))
    return gkq.ClusteredArray(book, idx.astype(jnp.uint8))

  return jax.jit(lambda t: jax.tree.map(one, t))(tree)


class AttentionBlock(nn.Module):
  """Self-attention (DenseGeneral projections) then an Einsum and a Dense head."""

  @nn.compact
  def __call__(self, x):
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)(x)
    h = nn.relu(nn.Einsum((16, 8), "btd,df->btf", name="mix")(h))
    return nn.Dense(4)(h)


LINEN = {
    "mlp": (MLP((32, 16)), (2, 8, 8, 1)),
    "lenet5": (LeNet5(), (2, 28, 28, 1)),
    "resnet_tiny": (ResNetTiny(), (2, 16, 16, 3)),
    "attention": (AttentionBlock(), (2, 5, 16)),
}


def random_variables(model, x, seed=0):
  """Variables of ``model`` filled from numpy (no init to compile): params in [-1, 1) / sqrt(fan
  in), batch statistics in [0.5, 1.5)."""
  rng = np.random.default_rng(seed)

  def fill(path, spec):
    if gkq.path_string(path).startswith("batch_stats"):
      return jnp.asarray(rng.uniform(0.5, 1.5, spec.shape), spec.dtype)
    fan_in = np.prod(spec.shape[:-1]) if len(spec.shape) > 1 else 1
    return jnp.asarray(rng.uniform(-1, 1, spec.shape) / np.sqrt(fan_in), spec.dtype)

  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def nnx_random(make, seed=0):
  """graphdef and a state filled from numpy, without running the initializers."""
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  fill = lambda s: jnp.asarray(rng.uniform(-0.5, 0.5, s.shape), s.dtype)  # noqa: E731
  return graphdef, jax.tree.map(fill, state)


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _linen_case(name, granularity="layer"):
  model, shape = LINEN[name]
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  variables = random_variables(model, x)
  return model, x, variables, cheap_quantize(variables["params"], 3, granularity)


@pytest.mark.parametrize("name", list(LINEN))
def test_linen_packed_apply_equals_dense_apply(name):
  model, x, variables, q = _linen_case(name, "channel" if name == "mlp" else "layer")
  dense = jax.jit(lambda q, x: model.apply({**variables, "params": gkq.dequantize(q)}, x))(q, x)
  packed = jax.jit(lambda p, x: gkq.apply_packed(model, {**variables, "params": p}, x,
                                                 kernel="xla"))(gkq.pack_tree(q), x)
  _close(packed, dense)


class NnxNet(nnx.Module):
  """Conv, Linear, Einsum and multi-head attention in one nnx module."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.hidden = nnx.Linear(8, 16, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16,
                                            decode=False, rngs=rngs)
    self.mix = nnx.Einsum("btd,df->btf", (16, 8), (8,), rngs=rngs)

  def __call__(self, images):
    h = nnx.relu(self.conv(images)).reshape(images.shape[0], -1, 8)  # tokens
    h = self.attention(nnx.relu(self.hidden(h)))
    return self.mix(h).mean(axis=1)


def test_nnx_packed_model_equals_dense_model():
  graphdef, state = nnx_random(NnxNet)
  q = cheap_quantize(state)
  images = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 3))
  forward = nnx.jit(lambda m, x: m(x))
  dense = forward(nnx.merge(graphdef, gkq.dequantize(q)), images)
  _close(forward(gkq.merge_packed(graphdef, gkq.pack_tree(q), kernel="xla"), images), dense)


def _deep_mlp(width=128, depth=4):
  model = MLP((width,) * depth, num_classes=width)
  x = jnp.ones((1, width))
  return model, x, cheap_quantize(random_variables(model, x)["params"], 4)


def test_the_whole_dense_model_never_exists_during_the_forward():
  model, x, q = _deep_mlp()
  layer_bytes = 128 * 128 * 4
  packed = gkq.pack_tree(q)

  def temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

  everything = temp_bytes(lambda q, x: model.apply({"params": gkq.dequantize(q)}, x), q, x)
  ours = temp_bytes(lambda p, x: gkq.apply_packed(model, {"params": p}, x, kernel="xla"),
                    packed, x)
  assert everything >= 4 * layer_bytes  # dequantize-then-apply holds all five kernels
  assert ours <= layer_bytes + 16 * 1024  # one dense kernel plus activations


class ReadsItsOwnWay(nn.Module):
  """Declares its weight, then reads the stored variable and transposes it."""

  @nn.compact
  def __call__(self, x):
    self.param("w", nn.initializers.lecun_normal(), (4, x.shape[-1]))
    return x @ self.get_variable("params", "w").T


class NnxReadsItsOwnWay(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 6)))

  def __call__(self, x):
    return x @ self.w.get_value().T


def test_a_layer_that_cannot_run_packed_falls_back_to_its_dense_weight_and_says_which():
  x = jnp.ones((2, 6))
  model = ReadsItsOwnWay()
  q = cheap_quantize(random_variables(model, x)["params"])
  with pytest.warns(UserWarning, match=r"params/w is read as `.T`.*uses its dense weight"):
    y = gkq.apply_packed(model, {"params": gkq.pack_tree(q)}, x, kernel="xla")
  _close(y, model.apply({"params": gkq.dequantize(q)}, x))

  graphdef, state = nnx_random(NnxReadsItsOwnWay)
  nq = cheap_quantize(state)
  with pytest.warns(UserWarning, match=r"^gkq_jax: w is read as `.T`"):
    y = gkq.merge_packed(graphdef, gkq.pack_tree(nq), kernel="xla")(x)
  _close(y, nnx.merge(graphdef, gkq.dequantize(nq))(x))


FIRST_VALUES = [-1e30, -5.0, -1.0, -0.999, -0.0, 0.5, 1.0, 7.0, 1e30, np.nan, np.inf, -np.inf]


def test_the_packed_forward_is_the_dense_forward_whatever_the_input_starts_with():
  # The dense copy waits for the layer's input through a slice whose start is read off the
  # input's first value; no value of it may change the weights (issue 26: <= -1 rotated
  # the kernel's rows by one).
  model = nn.Dense(64, use_bias=False)
  w = np.random.default_rng(0).standard_normal((48, 64)).astype(np.float32)
  q = gkq.quantize({"kernel": jnp.asarray(w)}, None, [gkq.bits_rule("kernel", 3)],
                   granularity="channel")
  x = np.random.default_rng(100).standard_normal((len(FIRST_VALUES), 3, 48)).astype(np.float32)
  x[:, 0, 0] = FIRST_VALUES
  x[len(x) // 2:] *= -1  # and inputs of either sign after the first value
  x[len(x) // 2:, 0, 0] = FIRST_VALUES[len(x) // 2:]
  packed = jax.jit(lambda p, x: gkq.apply_packed(model, {"params": p}, x, kernel="xla"))
  dense = jax.jit(lambda p, x: model.apply({"params": p}, x))
  for batch in x:
    np.testing.assert_array_equal(packed(gkq.pack_tree(q), batch),
                                  dense(gkq.dequantize(q), batch))
  graphdef, state = nnx_random(lambda rngs: nnx.Linear(48, 64, use_bias=False, rngs=rngs))
  nq = cheap_quantize(state, 3, "channel")
  run = nnx.jit(lambda m, x: m(x))
  for batch in x:
    np.testing.assert_array_equal(run(gkq.merge_packed(graphdef, gkq.pack_tree(nq),
                                                       kernel="xla"), batch),
                                  run(nnx.merge(graphdef, gkq.dequantize(nq)), batch))


def test_a_packed_tree_from_another_model_is_an_error():
  model, _, variables, _ = _linen_case("mlp")
  other = cheap_quantize(random_variables(MLP((16, 16)), jnp.ones((1, 64)))["params"])
  with pytest.raises(Exception, match=r"Dense_0.*expected to generate shape \(64, 32\).*"
                                      r"has shape \(64, 16\)"):
    gkq.apply_packed(model, {"params": gkq.pack_tree(other)}, jnp.ones((1, 64)))
  with pytest.raises(ValueError, match="kernel='fast' is not one of"):
    gkq.apply_packed(model, variables, jnp.ones((1, 64)), kernel="fast")
  # nnx.merge does not compare shapes: the layer's own shape does.
  graphdef, _ = nnx_random(lambda rngs: nnx.Linear(64, 32, rngs=rngs))
  _, state = nnx_random(lambda rngs: nnx.Linear(64, 16, rngs=rngs))
  with pytest.raises(ValueError, match=r"kernel: the packed weight has shape \(64, 16\), the "
                                       r"Linear expects \(64, 32\)"):
    gkq.merge_packed(graphdef, gkq.pack_tree(cheap_quantize(state)))


class LutNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))  # 128 -> 32: the kernel takes it
    return nn.Dense(16)(x)  # 32 inputs are 4 words of 8: falls back to XLA


def test_lut_route_runs_dense_layers_through_the_kernel_and_names_fallbacks():
  model = LutNet()
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 128))
  q = cheap_quantize(random_variables(model, x)["params"], 4, "channel")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = gkq.apply_packed(model, {"params": gkq.pack_tree(q)}, x, kernel="lut")
  messages = [str(w.message) for w in caught]
  assert any("params/Dense_1/kernel cannot run through the lookup-table kernel" in m
             for m in messages), messages
  assert not any("Dense_0" in m for m in messages)
  _close(y, model.apply({"params": gkq.dequantize(q)}, x))

  # The first layer again, in nnx: the same kernel call (no new compilation).
  graphdef, state = nnx_random(lambda rngs: nnx.Linear(128, 32, rngs=rngs))
  nq = cheap_quantize(state, 4, "channel")
  layer = gkq.merge_packed(graphdef, gkq.pack_tree(nq), kernel="lut")
  _close(layer(x), nnx.merge(graphdef, gkq.dequantize(nq))(x))
