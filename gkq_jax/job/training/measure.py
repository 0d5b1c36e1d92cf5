"""The survey's criteria, measured the same way for every method.

Parameters and fp32 bytes of the (dense) variables, bytes of the file
:func:`gkq_jax.save` writes, multiply-accumulates counted from the model's
own Dense / Conv calls, latency of the jitted forward pass, and the energy
estimate of :mod:`gkq_jax.energy`.

Latency: every method's forward is compiled and warmed up first, then each
round times every method once, in turn, so that whatever else the machine is
doing spreads over all of them alike; the figure is the median over rounds.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import gkq_jax as gkq


def parameter_count(params: Any) -> int:
  """Scalars the model stores: a leaf's size, or its non-zeros for a leaf stored
  sparse (a clustered leaf with a pinned zero: pruned weights, sparse residuals)."""
  total = 0
  for leaf in jax.tree.leaves(params, is_leaf=gkq.is_clustered):
    if gkq.is_clustered(leaf) and leaf.pinned_zero:
      total += int(np.count_nonzero(np.asarray(leaf.dequantize())))
    else:
      total += int(np.prod(np.shape(leaf) if not gkq.is_clustered(leaf) else leaf.shape))
  return total


def count_macs(model: nn.Module, variables: Any, sample_shape) -> int:
  """Multiply-accumulates of one example's forward: every Dense / Conv call
  contributes (output elements) x (kernel elements per output channel)."""
  counts = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv)):
      # A grouped conv's kernel is (kh, kw, cin / groups, cout): the same formula holds.
      kernel = module.get_variable("params", "kernel")
      counts.append(int(np.prod(out.shape)) * int(np.prod(kernel.shape[:-1])))
    return out

  x = jax.ShapeDtypeStruct((1,) + tuple(sample_shape), jnp.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return int(sum(counts))


def forward(model: nn.Module) -> Callable:
  """The jitted inference forward ``(variables, x) -> logits``."""
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


def latencies(forwards: dict[str, tuple[Callable, Any]], sample_shape, batch_sizes,
              repeats: int, warmup: int = 3, seed: int = 0) -> dict[str, dict[int, float]]:
  """Median seconds per call of each ``name -> (jitted fn, variables)``, per batch size,
  measured round-robin (see the module docstring)."""
  if repeats < 1:
    raise ValueError(f"survey.latency_repeats must be >= 1, got {repeats}.")
  out = {name: {} for name in forwards}
  for batch in batch_sizes:
    x = np.random.default_rng(seed).standard_normal((batch,) + tuple(sample_shape), np.float32)
    for fn, variables in forwards.values():
      for _ in range(warmup):
        jax.block_until_ready(fn(variables, x))
    times = {name: [] for name in forwards}
    for _ in range(repeats):
      for name, (fn, variables) in forwards.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(variables, x))
        times[name].append(time.perf_counter() - start)
    for name, values in times.items():
      out[name][batch] = float(np.median(values))
  return out


def energy(model: nn.Module, stored: Any, sample_shape, leaf_bytes: dict | None = None):
  """Energy per example (uJ) and its breakdown from :func:`gkq_jax.estimate_energy`,
  for the variables as stored (clustered leaves: index-width MACs), with the weight
  traffic of each leaf taken from the bytes the file gives it (``leaf_bytes``)."""
  x = jnp.zeros((1,) + tuple(sample_shape), jnp.float32)
  estimate = gkq.estimate_energy(lambda v, x: model.apply(v, x, train=False), stored, x,
                                 stored_bytes=leaf_bytes, xla_check=False)
  return {"total_uj": estimate.total_uj, "mac_uj": estimate.mac_uj,
          "weight_dram_uj": estimate.weight_dram_uj,
          "codebook_sram_uj": estimate.codebook_sram_uj,
          "activation_uj": estimate.activation_uj, "macs": estimate.macs}
