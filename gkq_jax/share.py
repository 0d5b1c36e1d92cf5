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

from gkq_jax.quantize import ClusteredArray

REDUCTIONS = ("mean", "sum")
_PLAIN = -1  # segment marker of a leaf that is not clustered


def _is_clustered(x):
  return isinstance(x, ClusteredArray)


def cluster_segments(leaf: ClusteredArray) -> tuple[jax.Array, int]:
  """(segment id of every weight, in the dense layout; number of segments)."""
  idx = leaf.indices.astype(jnp.int32)
  if leaf.vector_shape is not None:
    k, d = leaf.codebook.shape
    coord = jnp.arange(d, dtype=jnp.int32).reshape((d,) + (1,) * idx.ndim)
    seg = idx[None] * d + coord  # (d, *rest) -> vector axes lead, as in dequantize
    return seg.reshape(leaf.shape), k * d
  channels, k = leaf.codebook.shape
  if channels > 1:
    idx = idx + jnp.arange(channels, dtype=jnp.int32) * k
  return idx, channels * k


class ShareCentroidsState(NamedTuple):
  segments: Any  # per weight: its cluster id (int32), or a scalar -1 for plain leaves
  counts: Any  # per cluster: number of members (float32), or a scalar for plain leaves
  frozen: Any  # per weight: True where it must not move (pinned zeros)


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
    if not _is_clustered(leaf):
      return (jnp.full((), _PLAIN, jnp.int32), jnp.zeros((), jnp.float32),
              jnp.zeros((), bool))
    seg, n = cluster_segments(leaf)
    counts = jax.ops.segment_sum(jnp.ones(seg.size, jnp.float32), seg.reshape(-1), n)
    pinned = leaf.pinned_zero and leaf.vector_shape is None
    frozen = leaf.indices == 0 if pinned else jnp.zeros(leaf.shape, bool)
    return seg, counts, frozen

  triples = jax.tree.map(leaf_state, quantized, is_leaf=_is_clustered)
  treedef = jax.tree.structure(quantized, is_leaf=_is_clustered)
  flat = treedef.flatten_up_to(triples)
  state = ShareCentroidsState(*(treedef.unflatten([t[i] for t in flat]) for i in range(3)))

  def init_fn(params):
    del params
    return state

  def update_fn(updates, state, params=None):
    del params

    def project(u, seg, counts, frozen):
      if seg.ndim == 0 or isinstance(u, optax.MaskedNode):
        return u
      n = counts.shape[0]
      total = jax.ops.segment_sum(u.reshape(-1), seg.reshape(-1), n)
      if reduce == "mean":
        total = total / jnp.maximum(counts, 1.0)
      shared = total[seg].astype(u.dtype)
      return jnp.where(frozen, jnp.zeros_like(shared), shared)

    masked = lambda x: isinstance(x, optax.MaskedNode)  # inside optax.masked
    return jax.tree.map(project, updates, state.segments, state.counts, state.frozen,
                        is_leaf=masked), state

  return optax.GradientTransformation(init_fn, update_fn)


def refresh_codebooks(quantized: Any, params: Any) -> Any:
  """The ClusteredArrays of ``quantized`` with codebooks read back from the
  fine-tuned dense ``params`` (every member of a cluster holds its value)."""

  def refresh(leaf, dense):
    if not _is_clustered(leaf):
      return dense
    seg, n = cluster_segments(leaf)
    values = jax.ops.segment_max(dense.reshape(-1), seg.reshape(-1), n)
    counts = jax.ops.segment_sum(jnp.ones(seg.size), seg.reshape(-1), n)
    book = jnp.where(counts > 0, values, leaf.codebook.reshape(-1)).reshape(leaf.codebook.shape)
    return leaf.replace(codebook=book.astype(leaf.codebook.dtype))

  return jax.tree.map(refresh, quantized, params, is_leaf=_is_clustered)
