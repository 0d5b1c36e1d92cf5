"""The job's models and their registry."""

import jax
import jax.numpy as jnp
import numpy as np

from gkq_jax.job import models


def count_params(model, shape):
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def test_parameter_counts_match_the_papers():
  assert count_params(models.MLP(models.LENET_300_100), (1, 28, 28, 1)) == 266_610
  assert count_params(models.LeNet5(), (1, 28, 28, 1)) == 431_080
  # ResNet-34 with the ImageNet head: 21.8 M parameters (torchvision: 21,797,672).
  assert count_params(models.ResNet34(1000, "imagenet"), (1, 64, 64, 3)) == 21_797_672
  speech = count_params(models.MLP(models.SPEECH_MLP, 71, norm_every=2), (1, 40 * 15))
  assert speech > 10_000_000


def test_resnet_stems_and_tiny_variant_run():
  for stem in ("cifar", "imagenet"):
    model = models.ResNetTiny(10, stem)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)))
    assert model.apply(variables, jnp.ones((2, 16, 16, 3))).shape == (2, 10)


def test_bfloat16_compute_keeps_fp32_params_and_logits():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  full = models.ResNetTiny(10)
  mixed = models.ResNetTiny(10, dtype=jnp.bfloat16)
  variables = full.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(mixed.init(jax.random.PRNGKey(0), x))
  out32, stats32 = full.apply(variables, x, train=True, mutable=["batch_stats"])
  out16, stats16 = mixed.apply(variables, x, train=True, mutable=["batch_stats"])
  assert out16.dtype == jnp.float32
  assert {a.dtype for a in jax.tree.leaves(stats16)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(out16, out32, atol=0.05 * float(jnp.abs(out32).max()))
