"""Low-rank factorization of Dense and conv kernels by truncated SVD (Yu et al.).

A Dense kernel ``(m, n)`` becomes ``first (m, r) @ second (r, n)``. A conv
kernel ``(kh, kw, cin, cout)`` is read as the ``(kh*kw*cin, cout)`` matrix, so
it becomes a kh x kw conv to ``r`` channels, ``first (kh, kw, cin, r)``,
followed by a 1x1 conv, ``second (1, 1, r, cout)``: the two convolutions
compose to the original one exactly at full rank, because a 1x1 conv is a
matrix product over channels.

A factorized layer's params are ``{"first": {"kernel"}, "second": {"kernel",
"bias"}}`` (the bias, if any, moves to the second factor); a Flax model that
builds its factorized layers as two sub-layers named ``first`` and ``second``
(``gkq_jax/job/layers.py`` does) takes them as they are. Both factors get
``sqrt(s)`` of the singular values, so they have similar scales for
fine-tuning and for weight sharing afterwards.

Ranks come from a target parameter ratio (:func:`rank_for_ratio`) or a kept
energy fraction, the share of ``sum(s**2)`` that the kept singular values
hold (:func:`rank_for_energy`). :func:`low_rank_sparse` adds Yu et al.'s
sparse residual: ``W ~ first @ second + S`` with ``S`` holding the largest
entries of what the low-rank part misses.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gkq_jax._paths import named_leaves


def _as_matrix(kernel) -> jax.Array:
  kernel = jnp.asarray(kernel)
  if kernel.ndim < 2:
    raise ValueError(f"a kernel to factorize needs ndim >= 2 (Dense (m, n) or conv "
                     f"(kh, kw, cin, cout)); got shape {kernel.shape}.")
  return kernel.reshape(-1, kernel.shape[-1])


def _check_rank(rank, shape) -> int:
  m, n = int(np.prod(shape[:-1])), int(shape[-1])
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
    raise ValueError(f"rank must be an int, got {rank!r}.")
  if not 1 <= rank <= min(m, n):
    raise ValueError(f"rank={rank} is outside 1..{min(m, n)} = min(m, n) for a kernel of "
                     f"shape {tuple(shape)} read as a {m} x {n} matrix.")
  return int(rank)


def factorize(kernel, rank: int) -> tuple[jax.Array, jax.Array]:
  """(first, second): the best rank-``rank`` approximation of ``kernel`` in
  the Frobenius norm (Eckart-Young), split as U sqrt(S) and sqrt(S) V^T."""
  kernel = jnp.asarray(kernel)
  return _factorize(kernel, _check_rank(rank, kernel.shape))


@functools.partial(jax.jit, static_argnums=1)
def _factorize(kernel, rank: int):
  u, s, vt = jnp.linalg.svd(_as_matrix(kernel).astype(jnp.float32), full_matrices=False)
  root = jnp.sqrt(s[:rank])
  first = (u[:, :rank] * root).reshape(kernel.shape[:-1] + (rank,))
  second = (root[:, None] * vt[:rank]).reshape((1,) * (kernel.ndim - 2) + (rank,
                                                                           kernel.shape[-1]))
  return first.astype(kernel.dtype), second.astype(kernel.dtype)


@jax.jit
def reconstruct(first, second) -> jax.Array:
  """The kernel the two factors compose to (the shape of the original)."""
  rank = first.shape[-1]
  return (first.reshape(-1, rank) @ second.reshape(rank, -1)).reshape(
      first.shape[:-1] + (second.shape[-1],))


def singular_values(kernel) -> jax.Array:
  """Singular values of the kernel read as a ``(prod(shape[:-1]), shape[-1])`` matrix."""
  return _singular_values(_as_matrix(kernel))


@jax.jit
def _singular_values(matrix):
  return jnp.linalg.svd(matrix.astype(jnp.float32), compute_uv=False)


def truncation_error(kernel, rank: int) -> jax.Array:
  """Frobenius norm of ``kernel - reconstruct(*factorize(kernel, rank))``:
  sqrt of the sum of the dropped squared singular values (Eckart-Young)."""
  rank = _check_rank(rank, jnp.shape(kernel))
  s = np.asarray(singular_values(kernel), np.float64)
  return jnp.float32(np.sqrt(np.sum(s[rank:] ** 2)))


def rank_for_ratio(shape, ratio: float) -> int:
  """The largest rank whose two factors hold at most ``ratio`` x the kernel's
  parameters: r (m + n) <= ratio m n; at least 1, at most min(m, n)."""
  if not 0 < ratio <= 1:
    raise ValueError(f"parameter ratio must be in (0, 1], got {ratio}.")
  m, n = int(np.prod(shape[:-1])), int(shape[-1])
  return int(min(min(m, n), max(1, np.floor(ratio * m * n / (m + n)))))


def rank_for_energy(kernel, energy: float) -> int:
  """The smallest rank whose singular values keep ``energy`` of sum(s**2)."""
  if not 0 < energy <= 1:
    raise ValueError(f"kept energy fraction must be in (0, 1], got {energy}.")
  s2 = np.asarray(singular_values(kernel), np.float64) ** 2
  kept = np.cumsum(s2) / max(s2.sum(), np.finfo(np.float64).tiny)
  return int(min(len(s2), np.searchsorted(kept, energy - 1e-12) + 1))


def choose_ranks(params: Any, *, pattern: str = "", ratio: float | None = None,
                 energy: float | None = None) -> dict[str, int]:
  """Rank per layer (``'/'``-joined path of the layer holding ``kernel``).

  The layers are the parents of the ``kernel`` leaves whose layer path
  ``re.search``-es ``pattern`` (all kernels for ``""``); exactly one of
  ``ratio`` (parameter ratio) and ``energy`` (kept energy fraction) decides.
  """
  if (ratio is None) == (energy is None):
    raise ValueError("pass exactly one of ratio= (parameter ratio) and energy= "
                     "(kept energy fraction).")
  ranks = {}
  for path, leaf in named_leaves(params):
    layer, _, name = path.rpartition("/")
    if name != "kernel" or jnp.ndim(leaf) < 2 or not re.search(pattern, layer):
      continue
    ranks[layer] = rank_for_ratio(jnp.shape(leaf), ratio) if ratio is not None \
        else rank_for_energy(leaf, energy)
  if not ranks:
    raise ValueError(f"no kernel's layer path matches pattern {pattern!r}; paths look like "
                     f"{[p for p, _ in named_leaves(params)][:4]}.")
  return ranks


def factorize_layer(layer: Mapping[str, Any], rank: int, sparse: Any = None) -> dict:
  """``{"kernel", "bias"?}`` -> ``{"first": {"kernel"}, "second": {"kernel", "bias"?}}``,
  plus ``{"residual": {"kernel": sparse}}`` when a sparse residual is given."""
  if "kernel" not in layer:
    raise ValueError(f"a layer to factorize needs a 'kernel' entry; got keys {sorted(layer)}.")
  first, second = factorize(layer["kernel"], rank)
  out = {"first": {"kernel": first}, "second": {"kernel": second}}
  if "bias" in layer:
    out["second"]["bias"] = jnp.asarray(layer["bias"])
  if sparse is not None:
    out["residual"] = {"kernel": jnp.asarray(sparse)}
  return out


def factorize_params(params: Any, ranks: Mapping[str, int]) -> Any:
  """``params`` (nested dicts) with each layer named in ``ranks`` factorized."""
  out = jax.tree.map(lambda x: x, params)  # fresh containers, same leaves
  for path, rank in ranks.items():
    parent, key = _walk(out, path)
    parent[key] = factorize_layer(parent[key], rank)
  return out


def _walk(tree, path: str):
  keys = path.split("/")
  node = tree
  for key in keys[:-1]:
    if not isinstance(node, dict) or key not in node:
      raise ValueError(f"layer {path!r} is not in the params tree.")
    node[key] = dict(node[key])
    node = node[key]
  if not isinstance(node, dict) or keys[-1] not in node:
    raise ValueError(f"layer {path!r} is not in the params tree.")
  return node, keys[-1]


def low_rank_sparse(kernel, rank: int, sparse_fraction: float,
                    iterations: int = 10) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(first, second, sparse) with ``kernel ~ reconstruct(first, second) + sparse``.

  GoDec-style alternation (Yu et al.'s low-rank + sparse decomposition):
  L = best rank-r approximation of (W - S), then S = the ``sparse_fraction``
  largest-magnitude entries of (W - L); each step can only lower the error.
  """
  kernel = jnp.asarray(kernel, jnp.float32)
  rank = _check_rank(rank, kernel.shape)
  if not 0 <= sparse_fraction < 1:
    raise ValueError(f"sparse_fraction must be in [0, 1), got {sparse_fraction}.")
  if iterations < 1:
    raise ValueError(f"iterations must be >= 1, got {iterations}.")
  count = int(round(sparse_fraction * kernel.size))
  return _low_rank_sparse(kernel, rank, count, iterations)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _low_rank_sparse(kernel, rank, count, iterations):
  def top(residual):
    if count == 0:
      return jnp.zeros_like(residual)
    flat = residual.reshape(-1)
    _, idx = jax.lax.top_k(jnp.abs(flat), count)
    return jnp.zeros_like(flat).at[idx].set(flat[idx]).reshape(residual.shape)

  def step(_, sparse):
    first, second = factorize(kernel - sparse, rank)
    return top(kernel - reconstruct(first, second))

  sparse = jax.lax.fori_loop(0, iterations, step, jnp.zeros_like(kernel))
  first, second = factorize(kernel - sparse, rank)
  return first, second, top(kernel - reconstruct(first, second))
