"""Fine-tuning on shared centroids, as an optax transformation.

``share_centroids(q)`` maps each update of a clustered weight to the mean of
its cluster's updates (the projection onto the weight-shared subspace) or to
their sum (Deep Compression's centroid gradient, meant for plain SGD). Since
every member of a cluster then moves by the same amount, weights that start on
their shared values stay on them, bit for bit. Put it last in a chain:

    tx = optax.chain(optax.sgd(lr, momentum=0.9), share_centroids(q))

Composes with ``optax.masked`` and :func:`gkq_jax.prune.keep_pruned`; a pruned
weight (the pinned zero centroid) never moves.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gkq_jax import _vectors
from gkq_jax.quantize import ClusteredArray, is_clustered

REDUCTIONS = ("mean", "sum")
_PLAIN = -1  # segment marker of a leaf that is not clustered


def _cluster_segments(leaf: ClusteredArray) -> tuple[jax.Array, int]:
  """(segment id of every weight, in the dense layout; number of segments)."""
  idx = leaf.indices.astype(jnp.int32)
  if leaf.vector_shape is not None:
    k, d = leaf.codebook.shape
    seg = idx[..., None] * d + jnp.arange(d, dtype=jnp.int32)  # (*rest, d)
    return _vectors.from_vectors(seg, leaf.vector_axis, leaf.vector_shape), k * d  # as dequantize
  channels, k = leaf.codebook.shape
  if channels > 1:
    idx = idx + jnp.arange(channels, dtype=jnp.int32) * k
  return idx, channels * k


class ShareCentroidsState(NamedTuple):
  segments: Any  # per weight: its cluster id (int32), or a scalar -1 for plain leaves
  scale: Any  # per cluster: 1/size ("mean") or 1 ("sum"); 0 for a pinned zero


def share_centroids(quantized: Any, reduce: str = "mean") -> optax.GradientTransformation:
  """An optax transformation that keeps clustered weights on shared values.

  Args:
    quantized: the output of :func:`gkq_jax.quantize` (its ClusteredArray
      leaves give the clusters; the params being trained are its dequantized
      form, with the same tree structure).
    reduce: "mean" (projection) or "sum" (Deep Compression).
  """
  if reduce not in REDUCTIONS:
    raise ValueError(f"reduce={reduce!r} is not one of {REDUCTIONS}.")

  def leaf_state(leaf):
    if not is_clustered(leaf):
      return jnp.full((), _PLAIN, jnp.int32), jnp.zeros((), jnp.float32)
    seg, n = _cluster_segments(leaf)
    counts = jax.ops.segment_sum(jnp.ones(seg.size, jnp.float32), seg.reshape(-1), n)
    scale = 1.0 / jnp.maximum(counts, 1.0) if reduce == "mean" else jnp.ones(n, jnp.float32)
    if leaf.pinned_zero and leaf.vector_shape is None:
      # Index 0 of every codebook row is the exact zero of pruned weights.
      scale = scale.at[::leaf.codebook.shape[-1]].set(0.0)
    return seg, scale

  pairs = jax.tree.map(leaf_state, quantized, is_leaf=is_clustered)
  treedef = jax.tree.structure(quantized, is_leaf=is_clustered)
  flat = treedef.flatten_up_to(pairs)
  state = ShareCentroidsState(treedef.unflatten([p[0] for p in flat]),
                              treedef.unflatten([p[1] for p in flat]))

  def init_fn(params):
    del params
    return state

  def update_fn(updates, state, params=None):
    del params

    def project(u, seg, scale):
      if seg.ndim == 0 or isinstance(u, optax.MaskedNode):
        return u
      total = jax.ops.segment_sum(u.reshape(-1), seg.reshape(-1), scale.shape[0])
      return (total * scale)[seg].astype(u.dtype)

    masked = lambda x: isinstance(x, optax.MaskedNode)  # inside optax.masked
    return jax.tree.map(project, updates, state.segments, state.scale, is_leaf=masked), state

  return optax.GradientTransformation(init_fn, update_fn)


def refresh_codebooks(quantized: Any, params: Any) -> Any:
  """The ClusteredArrays of ``quantized`` with codebooks read back from the
  fine-tuned dense ``params`` (every member of a cluster holds its value)."""

  def refresh(leaf, dense):
    if not is_clustered(leaf):
      return dense
    seg, n = _cluster_segments(leaf)
    values = jax.ops.segment_max(dense.reshape(-1), seg.reshape(-1), n)
    counts = jax.ops.segment_sum(jnp.ones(seg.size), seg.reshape(-1), n)
    book = jnp.where(counts > 0, values, leaf.codebook.reshape(-1)).reshape(leaf.codebook.shape)
    return leaf.replace(codebook=book.astype(leaf.codebook.dtype))

  return jax.tree.map(refresh, quantized, params, is_leaf=is_clustered)
