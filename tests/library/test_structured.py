"""Structured pruning that shrinks arrays (gkq_jax.structured)."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkq_jax import structured
from gkq_jax.structured import ChannelGroup


class ConvNet(nn.Module):
  """conv -> BN -> relu -> conv -> relu -> flatten -> dense -> relu -> dense."""

  widths: Sequence[int] = (6, 5, 7)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.widths[0], (3, 3), padding="VALID", name="c0")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(x))
    x = nn.relu(nn.Conv(self.widths[1], (3, 3), padding="VALID", name="c1")(x))
    x = nn.relu(nn.Dense(self.widths[2], name="d0")(x.reshape(x.shape[0], -1)))
    return nn.Dense(3, name="d1")(x)


GROUPS = (ChannelGroup("c0", "c1", "bn"), ChannelGroup("c1", "d0"), ChannelGroup("d0", "d1"))
X = np.random.default_rng(1).standard_normal((4, 8, 8, 2), np.float32)


@pytest.fixture(scope="module")
def net():
  variables = jax.jit(ConvNet().init)(jax.random.PRNGKey(0), X)
  # Non-trivial batch statistics, so the norm's channels must be cut too.
  rng = np.random.default_rng(2)
  stats = jax.tree.map(lambda s: s + rng.random(s.shape, np.float32), variables["batch_stats"])
  return {"params": variables["params"], "batch_stats": stats}


def _zeroed(variables, removed):
  """The unpruned model with the removed channels' outputs forced to zero."""
  p = jax.tree.map(lambda x: x, variables["params"])
  p["bn"]["scale"] = p["bn"]["scale"].at[removed[0]].set(0)  # BN output 0 -> relu 0
  p["bn"]["bias"] = p["bn"]["bias"].at[removed[0]].set(0)
  for name, r in (("c1", removed[1]), ("d0", removed[2])):
    p[name]["kernel"] = p[name]["kernel"].at[..., r].set(0)
    p[name]["bias"] = p[name]["bias"].at[r].set(0)
  return dict(variables, params=p)


def test_pruned_model_equals_unpruned_with_channels_zeroed_and_is_smaller(net):
  pruned, keeps = net, []
  for group, keep_n in zip(GROUPS, (3, 2, 4)):
    keep = structured.keep_largest(structured.filter_norms(pruned, group, ord=1), keep_n)
    keeps.append(keep)
    pruned = structured.keep_channels(pruned, group, keep)
  removed = [np.setdiff1d(np.arange(n), k) for n, k in zip((6, 5, 7), keeps)]
  small = ConvNet((3, 2, 4))
  apply = jax.jit(ConvNet().apply)
  expected = apply(_zeroed(net, removed), X)
  np.testing.assert_allclose(jax.jit(small.apply)(pruned, X), expected, rtol=1e-5, atol=1e-5)
  assert pruned["params"]["c1"]["kernel"].shape == (3, 3, 3, 2)
  assert pruned["params"]["d0"]["kernel"].shape == (4 * 4 * 2, 4)  # flatten of 2 channels
  assert pruned["batch_stats"]["bn"]["mean"].shape == (3,)
  assert jax.tree.structure(pruned) == jax.tree.structure(
      jax.eval_shape(small.init, jax.random.PRNGKey(0), X))
  # And it is not the trivial "anything": other channels give other logits.
  wrong = _zeroed(net, [np.arange(3), removed[1], removed[2]])
  assert not np.allclose(apply(wrong, X), expected, atol=1e-3)


def test_l1_criterion_keeps_the_largest_filters(net):
  kernel = np.asarray(net["params"]["c0"]["kernel"])
  norms = np.asarray(structured.filter_norms(net, GROUPS[0], ord=1))
  np.testing.assert_allclose(norms, np.abs(kernel).sum((0, 1, 2)), rtol=1e-6)
  keep = structured.keep_largest(norms, 2)
  assert set(keep) == set(np.argsort(-norms)[:2])
  l2 = np.asarray(structured.filter_norms(net, GROUPS[2], ord=2))
  np.testing.assert_allclose(l2, np.linalg.norm(np.asarray(net["params"]["d0"]["kernel"]), axis=0),
                             rtol=1e-6)


def test_residual_group_prunes_every_producer():
  """Two layers whose outputs are added share channels: both lose the same ones."""

  class Residual(nn.Module):
    width: int = 5

    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(self.width, name="a")(x) + nn.Dense(self.width, name="b")(x))
      return nn.Dense(2, name="out")(h)

  x = np.random.default_rng(3).standard_normal((3, 4), np.float32)
  variables = jax.jit(Residual().init)(jax.random.PRNGKey(0), x)
  group = ChannelGroup(("a", "b"), "out")
  keep = np.array([0, 2, 3])
  pruned = structured.keep_channels(variables, group, keep)
  zeroed = jax.tree.map(lambda v: v, variables)
  for name in ("a", "b"):
    zeroed["params"][name]["kernel"] = zeroed["params"][name]["kernel"].at[:, [1, 4]].set(0)
    zeroed["params"][name]["bias"] = zeroed["params"][name]["bias"].at[jnp.array([1, 4])].set(1)
  zeroed["params"]["b"]["bias"] = zeroed["params"]["b"]["bias"].at[jnp.array([1, 4])].set(-1)
  np.testing.assert_allclose(jax.jit(Residual(3).apply)(pruned, x),
                             jax.jit(Residual().apply)(zeroed, x), rtol=1e-5, atol=1e-6)
  norms = structured.filter_norms(variables, group, ord=1)
  a, b = (np.abs(np.asarray(variables["params"][n]["kernel"])).sum(0) for n in ("a", "b"))
  np.testing.assert_allclose(norms, a + b, rtol=1e-6)


def test_data_free_merge_of_duplicate_neurons_is_exact():
  class MLP(nn.Module):
    width: int = 6

    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="d1")(nn.relu(nn.Dense(self.width, name="d0")(x)))

  x = np.random.default_rng(4).standard_normal((5, 4), np.float32)
  variables = jax.jit(MLP().init)(jax.random.PRNGKey(0), x)
  p = variables["params"]
  p["d0"]["kernel"] = p["d0"]["kernel"].at[:, 4].set(p["d0"]["kernel"][:, 1])  # 4 duplicates 1
  p["d0"]["bias"] = p["d0"]["bias"].at[4].set(p["d0"]["bias"][1])
  keep, merged = structured.merge_similar_neurons(variables, ChannelGroup("d0", "d1"), 5)
  assert len(keep) == 5 and (1 in keep) != (4 in keep)  # one of the pair went
  np.testing.assert_allclose(jax.jit(MLP(5).apply)(merged, x),
                             jax.jit(MLP().apply)(variables, x), rtol=1e-5, atol=1e-5)
  keep, merged = structured.merge_similar_neurons(variables, ChannelGroup("d0", "d1"), 3)
  assert merged["params"]["d1"]["kernel"].shape == (3, 3)


def test_remove_layers_and_bad_input(net):
  smaller = structured.remove_layers(net, ["bn"])
  assert "bn" not in smaller["params"] and "bn" not in smaller["batch_stats"]
  assert "bn" in net["params"]
  with pytest.raises(ValueError, match="cannot keep 0 of 6 channels"):
    structured.keep_largest(np.arange(6.0), 0)
  with pytest.raises(ValueError, match="cannot keep 7 of 6 channels"):
    structured.keep_largest(np.arange(6.0), 7)
  with pytest.raises(ValueError, match="not in the variables"):
    structured.keep_channels(net, ChannelGroup("c9", "c1"), [0])
  with pytest.raises(ValueError, match="neither the group's"):
    structured.keep_channels(net, ChannelGroup("c0", "d1"), [0])
  with pytest.raises(ValueError, match="no norm layers"):
    structured.merge_similar_neurons(net, GROUPS[0], 3)
