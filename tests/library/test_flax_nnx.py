"""flax.nnx end to end: importance of the whole state, fine-tuning with nnx.Optimizer,
and a file restored into a model with BatchNorm, Dropout and a list of layers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gkq_jax as gkq


class Net(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(6, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)])
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)

  def __call__(self, x):
    return self.layers[1](self.drop(nnx.relu(self.norm(self.layers[0](x)))))


X = jax.random.normal(jax.random.PRNGKey(0), (16, 6))
Y = jnp.arange(16) % 3
RULES = [gkq.ClusterRule(r"kernel$", 4)]


def loss_of(graphdef, state, batch):
  logits = nnx.merge(graphdef, state)(batch[0])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()


def test_importance_of_the_full_state_covers_float_leaves_only():
  graphdef, state = nnx.split(Net(nnx.Rngs(0)))  # holds uint32 RNG counts and RNG keys
  imp = gkq.compute_importance(lambda s, b: loss_of(graphdef, s, b), state, [(X, Y)])
  by_path = dict(gkq.named_leaves(imp))
  rng_state = imp["drop"]["rngs"]
  assert rng_state["count"].get_value() is None and rng_state["key"].get_value() is None
  assert by_path["layers/0/kernel"].shape == (6, 8)
  assert float(jnp.sum(by_path["layers/1/kernel"])) > 0
  q = gkq.quantize(state, imp, RULES)  # the importance tree is accepted as it is
  assert {p for p, _ in gkq.clustered_leaves(q)} == {"layers/0/kernel", "layers/1/kernel"}


@pytest.mark.parametrize("source", ["full_state", "param_state", "pure_dict"])
def test_share_centroids_under_nnx_optimizer(source):
  model = Net(nnx.Rngs(0))
  if source == "full_state":
    tree = nnx.split(model)[1]
  elif source == "param_state":
    tree = nnx.state(model, nnx.Param)
  else:
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  q = gkq.quantize(tree, None, RULES)
  nnx.update(model, gkq.dequantize(q))
  optimizer = nnx.Optimizer(model, optax.chain(optax.adam(0.05), gkq.share_centroids(q)),
                            wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(X), Y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  before = model.layers[0].kernel[...]
  for _ in range(3):
    step(model, optimizer)
  kernel = np.asarray(model.layers[0].kernel[...])
  assert not np.array_equal(kernel, before)
  assert len(np.unique(kernel)) <= 4 and len(np.unique(model.layers[1].kernel[...])) <= 4


def test_share_centroids_names_what_to_pass():
  model = Net(nnx.Rngs(0))
  q = gkq.quantize({"model": nnx.to_pure_dict(nnx.state(model, nnx.Param))}, None, RULES)
  with pytest.raises(ValueError, match=r"'model/layers/0/kernel'.*nnx.state\(model, nnx.Param\)"):
    nnx.Optimizer(model, gkq.share_centroids(q), wrt=nnx.Param)


def test_file_restores_into_a_model_with_a_list_of_layers(tmp_path):
  model = Net(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  q = gkq.quantize(state, None, RULES)
  gkq.save(tmp_path / "m.gkq", q)
  loaded = gkq.load(tmp_path / "m.gkq")
  assert isinstance(loaded, nnx.State) and isinstance(loaded["layers"][0]["kernel"], nnx.Param)
  assert isinstance(loaded["drop"]["rngs"]["key"][...], jax.Array)  # RNG keys come back as keys
  restored = Net(nnx.Rngs(7))
  nnx.update(restored, gkq.dequantize(loaded))
  restored.eval()
  expected = nnx.merge(graphdef, gkq.dequantize(q))
  expected.eval()
  np.testing.assert_array_equal(np.asarray(restored(X)), np.asarray(expected(X)))
  # Into an explicit target (as orbax restores): the target's structure and Variable types;
  # entries the target does not ask for (here the batch stats and RNG state) are left out.
  target = nnx.state(Net(nnx.Rngs(3)), nnx.Param)
  params = gkq.load(tmp_path / "m.gkq", target=target)
  assert jax.tree.structure(params, is_leaf=gkq.is_clustered) == jax.tree.structure(target)
  assert gkq.is_clustered(params["layers"][1]["kernel"].get_value())
  with pytest.raises(ValueError, match="'extra/kernel'.*not in"):
    gkq.load(tmp_path / "m.gkq", target={"extra": {"kernel": jnp.zeros((6, 8))}})


class Counting(nnx.Module):
  """Mutates its state in __call__: a step counter and BatchNorm statistics (train mode)."""

  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)
    self.steps = nnx.Variable(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    self.steps[...] += 1
    return self.out(nnx.relu(self.norm(self.hidden(x))))


def test_importance_straight_from_a_module_that_mutates_its_state():
  model = Counting(nnx.Rngs(0))
  loss = lambda m, b: optax.softmax_cross_entropy_with_integer_labels(m(b[0]), b[1]).mean()
  # The form: merging the caller's non-Param Variables inside the trace fails.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  with pytest.raises(Exception, match="different trace level"):
    gkq.compute_importance(lambda p, b: loss(nnx.merge(graphdef, p, rest), b), params,
                           [(X, Y)])
  imp = gkq.compute_importance(loss, model, [(X, Y), (X, Y)])
  assert isinstance(imp, nnx.State)
  by_path = dict(gkq.named_leaves(imp))
  assert set(by_path) == {"hidden/kernel", "hidden/bias", "norm/scale", "norm/bias",
                          "out/kernel", "out/bias"}  # Params only: no statistics, no counter
  # The same numbers as differentiating a copy of the model by hand, batch by batch.
  expected = jax.tree.map(jnp.zeros_like, params)
  for _ in range(2):
    copy = nnx.merge(*nnx.split(model), copy=True)
    grads = nnx.grad(loss)(copy, (X, Y))
    expected = jax.tree.map(lambda e, g: e + g * g / 2, expected, nnx.state(grads, nnx.Param))
  for path, value in gkq.named_leaves(expected):
    np.testing.assert_allclose(by_path[path], value, rtol=1e-5, atol=1e-12, err_msg=path)
  assert int(model.steps[...]) == 0 and not np.any(model.norm.mean[...])  # left as it was
  q = gkq.quantize(nnx.state(model), imp, RULES)
  assert {p for p, _ in gkq.clustered_leaves(q)} == {"hidden/kernel", "out/kernel"}
  gkq.quantize(nnx.state(model, nnx.Param), nnx.filter_state(imp, nnx.Param), RULES)
