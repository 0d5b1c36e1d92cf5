"""Weights re-assigned to their codebooks: one ECSQ Lloyd step with the codebook
held, and the straight-through forward that quantization-aware training uses.

Fine-tuning on shared values (:func:`gkq_jax.share_centroids`) keeps every
weight in the cluster it was given, so at a few values per layer only the
codebook entries learn. Training the float weights through their quantized
values instead (Courbariaux et al.'s straight-through estimator, with a
codebook of shared values rather than a uniform grid) lets weights change
cluster as the loss asks:

    loss(fake_reassign(params, q, h, prices=prices))   # forward on shared values

Each weight goes to the entry ``j`` of least ``h (w - c_j)^2 + price * bits_j``,
``bits_j = -log2`` of the share of the codebook row's weights in entry ``j``
now (the entry's entropy-coded length): with ``price = 0`` the nearest entry
(k-means), with the price per bit an ECSQ allocation chose for the layer
(:func:`gkq_jax.quantize_to_budget`'s ``Choice.setting``) the assignment ECSQ
itself would make, so the coded size stays where the allocation put it. Empty
entries are never chosen under a price (ECSQ's dead clusters stay dead).
:func:`reassign` also moves each entry to the importance-weighted mean of its
new members; alternated with training, it is the codebook's refresh.

Scalar codebooks only (per layer, per channel, per grouped channel); a
pinned zero stays an exact zero, and weights a mask prunes stay on it. A
leaf's sparse part (dense-and-sparse: weights kept exactly) stays where it is:
those weights keep index 0, count in no entry's share or mean, pass through
:func:`fake_reassign` as they are, and :func:`reassign` reads their values
from ``params``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from gkq_jax._clustering import is_traced
from gkq_jax._paths import path_keys, path_string
from gkq_jax.clustered import ClusteredArray, is_clustered

# The code length of an entry that holds no weight: never worth choosing under a price.
_EMPTY_BITS = 1e9


def _leaf_inputs(leaf: ClusteredArray, name: str, w, h, keep):
  if leaf.vector_shape is not None:
    raise ValueError(f"{name}: reassignment takes scalar codebooks (granularity layer, channel "
                     "or grouped channel), not vectors; quantize it with one of those.")
  if tuple(jnp.shape(w)) != tuple(leaf.shape):
    raise ValueError(f"{name}: params have shape {tuple(jnp.shape(w))}, the clustered leaf "
                     f"{tuple(leaf.shape)}; pass the params it was quantized from.")
  w = jnp.asarray(w, jnp.float32).reshape(-1)
  h = jnp.ones_like(w) if h is None else jnp.asarray(h, jnp.float32).reshape(-1)
  if keep is not None:
    keep = jnp.asarray(keep, bool).reshape(-1)
    if not leaf.pinned_zero:  # quantize pins a zero wherever its mask prunes
      if not is_traced(keep) and not bool(jnp.all(keep)):
        raise ValueError(f"{name}: the mask prunes weights but the leaf has no pinned zero "
                         "for them; quantize with the same masks.")
      keep = None
  return w, h, keep


def _assign(leaf: ClusteredArray, w, h, keep, price):
  """(new indices, flat codebook row of each weight) of one leaf."""
  k = leaf.codebook.shape[-1]
  book = jnp.asarray(leaf.codebook, jnp.float32).reshape(-1, k)
  rows = leaf.codebook_rows().reshape(-1)
  old = leaf.indices.reshape(-1).astype(jnp.int32)
  clustered = _clustered(leaf)
  counts = jax.ops.segment_sum(clustered.astype(jnp.float32), rows * k + old,
                               book.size).reshape(book.shape)
  share = counts / jnp.maximum(counts.sum(axis=1, keepdims=True), 1.0)
  bits = jnp.where(counts > 0, -jnp.log2(jnp.maximum(share, 1e-30)), _EMPTY_BITS)

  price = jnp.asarray(price, jnp.float32)

  def cost(j):
    err = w - book[:, j][rows]
    # Price 0 (k-means): the nearest entry, whatever the importance.
    return jnp.where(price > 0, h * err * err + price * bits[:, j][rows], err * err)

  def better(j, carry):  # K passes of O(N) memory, no N x K array
    best, arg = carry
    c = cost(j)
    take = c < best
    return jnp.where(take, c, best), jnp.where(take, j, arg)

  _, idx = jax.lax.fori_loop(1, k, better, (cost(0), jnp.zeros(w.shape, jnp.int32)))
  if keep is not None:
    idx = jnp.where(keep, idx, 0)
  return jnp.where(clustered, idx, 0), rows


def _clustered(leaf: ClusteredArray) -> jax.Array:
  """(size,) bool: False where the leaf keeps a weight exactly (its sparse part)."""
  size = leaf.indices.size
  if leaf.sparse is None:
    return jnp.ones(size, bool)
  return ~leaf.sparse.mask((size,))


def _by_key(tree) -> dict:
  """{key path: leaf} of a pytree (None leaves kept), or {} for None."""
  if tree is None:
    return {}
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  return {path_keys(p): leaf for p, leaf in flat}


def _per_leaf(fn, params, quantized, importance, prices, masks) -> dict:
  """{key path: fn(leaf, w, h, keep, price)} over the clustered leaves of ``quantized``."""
  dense, imps, keeps = _by_key(params), _by_key(importance), _by_key(masks)
  prices = dict(prices or {})
  out, names = {}, []
  flat, _ = jax.tree_util.tree_flatten_with_path(quantized, is_leaf=is_clustered)
  for path, leaf in flat:
    if not is_clustered(leaf):
      continue
    key, name = path_keys(path), path_string(path)
    if key not in dense:
      raise ValueError(f"{name}: clustered in quantized but missing from params; pass the "
                       "params tree quantized was made from.")
    price = prices.get(name, 0.0)
    if not is_traced(price) and not float(price) >= 0:
      raise ValueError(f"prices[{name!r}] = {price}: a price per bit must be >= 0.")
    names.append(name)
    w, h, keep = _leaf_inputs(leaf, name, dense[key], imps.get(key), keeps.get(key))
    out[key] = fn(leaf, w, h, keep, price)
  if not names:
    raise ValueError("quantized holds no ClusteredArray: pass the output of gkq_jax.quantize.")
  unknown = sorted(set(prices) - set(names))
  if unknown:
    raise ValueError(f"prices name {unknown[0]!r}, which quantized does not cluster (its "
                     f"clustered leaves: {names[:4]}).")
  return out


def _replace_by_key(tree, new: dict, is_leaf=None):
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: new.get(path_keys(path), leaf), tree, is_leaf=is_leaf)


def reassign(params: Any, quantized: Any, importance: Any = None, *,
             prices: Mapping[str, float] | None = None, masks: Any = None) -> Any:
  """``quantized`` with every clustered leaf's weights (read from ``params``,
  matched by path) re-assigned and its codebook re-fitted.

  Args:
    params: the float weights (e.g. latent weights of quantization-aware training).
    quantized: the output of :func:`gkq_jax.quantize` / ``quantize_to_budget``.
    importance: pytree like params (None: uniform), the h of the cost and of
      the weighted means.
    prices: {leaf path: price per bit} (the ECSQ ``lam``); missing: 0, the
      nearest entry.
    masks: pytree like params of bools; False (pruned) weights take index 0,
      the pinned zero.

  Returns:
    ``quantized`` with new indices (least cost, see the module docstring) and
    each non-empty entry at the h-weighted mean of its members (empty entries
    and a pinned zero keep their value). Pure and jit-able.
  """

  def refit(leaf, w, h, keep, price):
    idx, rows = _assign(leaf, w, h, keep, price)
    k = leaf.codebook.shape[-1]
    seg, n = rows * k + idx, leaf.codebook.size
    h = jnp.where(_clustered(leaf), h, 0.0)  # the kept weights are in no entry
    mass = jax.ops.segment_sum(h, seg, n)
    mean = jax.ops.segment_sum(h * w, seg, n) / jnp.where(mass > 0, mass, 1.0)
    old = jnp.asarray(leaf.codebook, jnp.float32).reshape(-1)
    book = jnp.where(mass > 0, mean, old)
    if leaf.pinned_zero:
      book = book.at[::k].set(0.0)
    out = leaf.replace(codebook=book.reshape(leaf.codebook.shape).astype(leaf.codebook.dtype),
                       indices=idx.reshape(leaf.indices.shape).astype(leaf.indices.dtype))
    return out if leaf.sparse is None else out.replace(sparse=leaf.sparse.take(w))

  new = _per_leaf(refit, params, quantized, importance, prices, masks)
  return _replace_by_key(quantized, new, is_leaf=is_clustered)


def fake_reassign(params: Any, quantized: Any, importance: Any = None, *,
                  prices: Mapping[str, float] | None = None, masks: Any = None) -> Any:
  """``params`` with every leaf ``quantized`` clusters replaced by the codebook
  value its weight is assigned to now (as :func:`reassign` assigns, codebook
  held), with a straight-through gradient: d out / d w = 1. Use it on the
  params inside the loss; leaves ``quantized`` does not cluster pass through."""

  def snap(leaf, w, h, keep, price):
    idx, rows = _assign(leaf, w, h, keep, price)
    k = leaf.codebook.shape[-1]
    snapped = jnp.asarray(leaf.codebook, jnp.float32).reshape(-1)[rows * k + idx]
    return jnp.where(_clustered(leaf), snapped, w)  # kept weights: themselves

  snapped = _per_leaf(snap, params, quantized, importance, prices, masks)

  def straight_through(path, w):
    value = snapped.get(path_keys(path))
    if value is None:
      return w
    w = jnp.asarray(w)
    return _straight_through(w, value.reshape(w.shape).astype(w.dtype))

  return jax.tree_util.tree_map_with_path(straight_through, params)


@jax.custom_jvp
def _straight_through(w, value):
  """``value`` exactly (w + stop_gradient(value - w) is off by rounding), d / d w = 1."""
  return value


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
  return primals[1], tangents[0]
