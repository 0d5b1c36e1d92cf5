"""Low-rank factorization by truncated SVD (gkq_jax.lowrank)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkq_jax import lowrank


def _kernel(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def test_full_rank_reproduces_dense_and_conv_layers():
  dense = _kernel((12, 7))
  first, second = lowrank.factorize(dense, 7)
  x = _kernel((5, 12), 1)
  np.testing.assert_allclose(x @ first @ second, x @ dense, rtol=1e-4, atol=1e-4)

  conv = _kernel((3, 3, 4, 6))
  first, second = lowrank.factorize(conv, 6)
  assert first.shape == (3, 3, 4, 6) and second.shape == (1, 1, 6, 6)
  x = _kernel((2, 9, 9, 4), 2)

  @jax.jit
  def both(conv, first, second):
    full = nn.Conv(6, (3, 3), strides=2, use_bias=False).apply({"params": {"kernel": conv}}, x)
    h = nn.Conv(6, (3, 3), strides=2, use_bias=False).apply({"params": {"kernel": first}}, x)
    return full, nn.Conv(6, (1, 1), use_bias=False).apply({"params": {"kernel": second}}, h)

  full, two = both(conv, first, second)
  np.testing.assert_allclose(two, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,rank", [((30, 20), 5), ((3, 3, 8, 16), 4)])
def test_rank_r_error_is_the_dropped_singular_values(shape, rank):
  kernel = _kernel(shape)
  first, second = lowrank.factorize(kernel, rank)
  assert first.shape[-1] == rank == second.shape[-2]
  error = np.linalg.norm(np.asarray(lowrank.reconstruct(first, second) - kernel))
  s = np.linalg.svd(np.asarray(kernel).reshape(-1, shape[-1]), compute_uv=False)
  expected = np.sqrt(np.sum(s[rank:] ** 2))  # Eckart-Young: nothing of rank r does better
  assert error == pytest.approx(expected, rel=1e-4)
  assert float(lowrank.truncation_error(kernel, rank)) == pytest.approx(expected, rel=1e-4)
  # Any other rank-r matrix does worse, e.g. a perturbed factor.
  worse = lowrank.reconstruct(first * 1.01, second)
  assert np.linalg.norm(np.asarray(worse - kernel)) > error


def test_ranks_from_ratio_and_energy():
  assert lowrank.rank_for_ratio((784, 300), 0.25) == 54  # 54 * 1084 <= 0.25 * 235200
  assert 54 * (784 + 300) <= 0.25 * 784 * 300 < 55 * (784 + 300)
  assert lowrank.rank_for_ratio((4, 3), 1e-6) == 1 and lowrank.rank_for_ratio((4, 3), 1) == 1
  kernel = jnp.diag(jnp.array([3.0, 2.0, 1.0]))  # energies 9, 4, 1 of 14
  assert lowrank.rank_for_energy(kernel, 9 / 14) == 1
  assert lowrank.rank_for_energy(kernel, 0.7) == 2
  assert lowrank.rank_for_energy(kernel, 1.0) == 3
  params = {"a": {"kernel": _kernel((40, 30)), "bias": jnp.zeros(30)},
            "b": {"kernel": _kernel((30, 10))}}
  assert lowrank.choose_ranks(params, pattern="^a$", ratio=0.5) == {"a": 8}
  ranks = lowrank.choose_ranks(params, energy=1.0)
  assert ranks == {"a": 30, "b": 10}
  factored = lowrank.factorize_params(params, {"a": 8})
  assert set(factored["a"]) == {"first", "second"}
  assert factored["a"]["second"]["bias"].shape == (30,)
  assert factored["b"]["kernel"] is params["b"]["kernel"]
  assert set(params["a"]) == {"kernel", "bias"}  # the input is left as it was


def test_bad_ranks_and_fractions_raise():
  kernel = _kernel((6, 4))
  with pytest.raises(ValueError, match=r"rank=5 is outside 1..4"):
    lowrank.factorize(kernel, 5)
  with pytest.raises(ValueError, match=r"rank=0 is outside"):
    lowrank.factorize(kernel, 0)
  with pytest.raises(ValueError, match="ratio must be in"):
    lowrank.rank_for_ratio((6, 4), 0)
  with pytest.raises(ValueError, match="energy fraction"):
    lowrank.rank_for_energy(kernel, 1.5)
  with pytest.raises(ValueError, match="exactly one of"):
    lowrank.choose_ranks({"a": {"kernel": kernel}})


def test_low_rank_plus_sparse_beats_low_rank_alone():
  kernel = _kernel((40, 30)) * 0.1 + jnp.outer(jnp.arange(40.0), jnp.ones(30)) / 40
  kernel = kernel.at[3, 7].add(5.0).at[20, 1].add(-4.0)  # outliers a rank-1 part cannot fit
  first, second, sparse = lowrank.low_rank_sparse(kernel, 1, 0.01)
  assert int(jnp.count_nonzero(sparse)) == 12  # 1% of 1200
  both = np.linalg.norm(np.asarray(lowrank.reconstruct(first, second) + sparse - kernel))
  assert both < 0.8 * float(lowrank.truncation_error(kernel, 1))
  assert float(jnp.abs(sparse[3, 7])) > 3 and float(jnp.abs(sparse[20, 1])) > 2
