"""Dense and conv layers that may be factorized, for the job's models.

``dense(...)`` / ``conv(...)`` give the plain flax layer, or at ``rank > 0``
its low-rank replacement: two layers named ``first`` and ``second``, the
params layout :mod:`gkq_jax.lowrank` produces (a conv becomes a kh x kw conv
to ``rank`` channels then a 1x1 conv). ``sparse=True`` adds Yu et al.'s sparse
residual: a ``residual`` kernel of the full shape, added to the output.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn


class LowRankDense(nn.Module):
  features: int
  rank: int
  sparse: bool = False

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.features, name="second")(nn.Dense(self.rank, use_bias=False,
                                                        name="first")(x))
    if self.sparse:
      y = y + nn.Dense(self.features, use_bias=False, name="residual")(x)
    return y


class LowRankConv(nn.Module):
  features: int
  rank: int
  kernel_size: Sequence[int]
  strides: Any = 1
  padding: Any = "SAME"
  use_bias: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.rank, self.kernel_size, self.strides, self.padding, use_bias=False,
                dtype=self.dtype, name="first")(x)
    return nn.Conv(self.features, (1,) * len(self.kernel_size), use_bias=self.use_bias,
                   dtype=self.dtype, name="second")(x)


def dense(features: int, name: str, ranks=(), sparse=()) -> nn.Module:
  """nn.Dense named ``name``, or its factorization when ``ranks`` gives it a rank."""
  rank = dict(ranks).get(name, 0)
  if rank:
    return LowRankDense(features, rank, name in tuple(sparse), name=name)
  return nn.Dense(features, name=name)


def conv(features: int, kernel_size, name: str, ranks=(), *, strides=1, padding="SAME",
         use_bias: bool = True, dtype=None) -> nn.Module:
  """nn.Conv named ``name``, or its factorization when ``ranks`` gives it a rank."""
  rank = dict(ranks).get(name, 0)
  if rank:
    return LowRankConv(features, rank, tuple(kernel_size), strides, padding, use_bias, dtype,
                       name=name)
  return nn.Conv(features, tuple(kernel_size), strides, padding, use_bias=use_bias,
                 dtype=dtype, name=name)


def scoped(ranks, prefix: str) -> tuple:
  """The entries of ``ranks`` under ``prefix/``, with the prefix dropped."""
  return tuple((name[len(prefix) + 1:], r) for name, r in ranks
               if name.startswith(prefix + "/"))
