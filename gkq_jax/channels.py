"""Per-output-channel clustering of LLM-sized matrices, streamed in bounded memory.

SqueezeLLM's setting: every output channel of every matrix of a transformer
gets its own codebook of K values, fitted by k-means weighted by the Fisher
importance (mean squared gradient) of each weight. A 7B model has about
200,000 such channels of 4,096 or 11,008 values each.

:func:`cluster_per_channel` clusters one matrix in chunks of whole channels,
each chunk one call of :func:`gkq_jax.grouped_kmeans_1d` (every channel a
group), so the working memory is a chunk's few buffers plus the outputs
(a float32 codebook per channel and uint8 indices), never channels x K x
values, and there is no Python loop over channels. Every chunk has the same
static shape (the last one is padded with copies of its last channel), so one
compilation serves all chunks of all matrices with the same input length.
:func:`stream_per_channel` does it for an iterator of matrices, which lets a
model stream in layer by layer and be written out as it goes.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp

from gkq_jax import sharding as sharding_lib
from gkq_jax._outliers import check_sparse, sparse_positions
from gkq_jax.clustered import ClusteredArray, SparseOutliers
from gkq_jax.kmeans1d import grouped_kmeans_1d

DEFAULT_CHUNK_VALUES = 1 << 22


def _as_matrix(name: str, array, what: str, channel_axes: int = 1):
  array = jnp.asarray(array)
  if not isinstance(channel_axes, int) or channel_axes < 1:
    raise ValueError(f"{name}: channel_axes must be a positive int, got {channel_axes!r}.")
  if array.ndim < channel_axes + 1:
    raise ValueError(f"{name}: {what} must have at least {channel_axes + 1} axes (inputs..., "
                     f"{channel_axes} output axis/axes), got shape {array.shape}.")
  return array.reshape(-1, math.prod(array.shape[array.ndim - channel_axes:]))


def cluster_per_channel(weight, importance=None, num_clusters: int = 16, *,
                        chunk_values: int = DEFAULT_CHUNK_VALUES, name: str = "weight",
                        channel_axes: int = 1, sparse_fraction: float = 0.0,
                        sparse_by: str = "sensitivity", **options) -> ClusteredArray:
  """One codebook per output channel (the last ``channel_axes`` axes) of ``weight``.

  Args:
    weight: (..., N) array; channel n is ``weight[..., n]`` (with
      ``channel_axes=2``, a (d, heads, head_dim) kernel has heads x head_dim
      channels; see :mod:`gkq_jax.axes`).
    importance: non-negative array of the same shape (e.g. the Fisher
      diagonal, mean g^2) or None for plain k-means.
    num_clusters: K, the codebook size of every channel.
    chunk_values: about how many values one call clusters (whole channels,
      at least one); bounds the working memory.
    name: the matrix's name, for error messages.
    sparse_fraction, sparse_by: dense-and-sparse, as
      :func:`gkq_jax.quantize` takes them (scope: this matrix): that share of
      the weights, the top by ``h w^2`` (h = 1 without importance) or ``|w|``,
      is kept exactly in the result's sparse part. Here the kept weights are
      given zero importance and clipped into their channel's range of the
      other weights before clustering, so they move no centroid and stretch
      no histogram (the channels keep their fixed length for the chunks).
      Unsharded weights, outside ``jax.jit``.
    **options: passed to :func:`gkq_jax.grouped_kmeans_1d` (method, init,
      max_iter, bins, ...). Channels are clustered independently, so the
      result does not depend on ``chunk_values``.

  Returns:
    A :class:`ClusteredArray` with codebook (N, K) and uint8 (K <= 256)
    indices of ``weight``'s shape, as ``quantize(..., granularity="channel")``.
  """
  sharding = sharding_lib.named_sharding(weight)
  if sharding is not None:  # each device clusters the channels it holds
    return _shard_by_shard(weight, importance, num_clusters, sharding, chunk_values, name,
                           channel_axes, options)
  w = _as_matrix(name, weight, "weight", channel_axes)
  rows, channels = w.shape
  h = None
  if importance is not None:
    h = _as_matrix(name, importance, "importance", channel_axes)
    if h.shape != w.shape:
      raise ValueError(f"{name}: importance has shape {jnp.shape(importance)}, the weight "
                       f"{jnp.shape(weight)}; they must match.")
  if not 1 <= num_clusters <= 65536:
    raise ValueError(f"{name}: num_clusters must be in 1..65536, got {num_clusters}.")
  kept = None
  if check_sparse(sparse_fraction, sparse_by, "matrix", "channel", None) > 0:
    kept, w, h = _set_aside(name, weight, importance, w, h, sparse_fraction, sparse_by)
  if chunk_values < 1:
    raise ValueError(f"chunk_values must be positive, got {chunk_values}.")
  per_call = int(min(channels, max(1, chunk_values // rows)))
  index_dtype = jnp.uint8 if num_clusters <= 256 else jnp.uint16
  books, indices = [], []
  for start in range(0, channels, per_call):
    stop = min(start + per_call, channels)
    # Channel-major rows of this chunk, padded with its last channel to the common shape.
    take = jnp.minimum(jnp.arange(start, start + per_call), stop - 1)
    x = w[:, take].T.reshape(-1)
    hx = None if h is None else h[:, take].T.reshape(-1)
    result = grouped_kmeans_1d(x, hx, (rows,) * per_call, num_clusters, **options)
    books.append(result.centroids[:stop - start])
    indices.append(result.assignments.reshape(per_call, rows)[:stop - start].astype(index_dtype))
  codebook = jnp.concatenate(books)
  idx = jnp.concatenate(indices).T.reshape(jnp.shape(weight))
  if kept is None or kept.size == 0:
    return ClusteredArray(codebook, idx)
  idx = idx.reshape(-1).at[kept].set(0).reshape(idx.shape)  # never read; 0 as quantize
  return ClusteredArray(codebook, idx, sparse=SparseOutliers(kept, jnp.reshape(weight, -1)[kept]))


def _set_aside(name, weight, importance, w, h, fraction, by):
  """(kept positions, w, h) with the kept weights clipped into their channel's
  range of the others and given zero importance."""
  if sharding_lib.named_sharding(weight) is not None:
    raise ValueError(f"{name} is sharded; dense-and-sparse (sparse_fraction > 0) takes "
                     "unsharded weights.")
  [pos] = sparse_positions([name], [weight], [importance], [None], fraction, by, "matrix")
  kept = jnp.asarray(pos, jnp.int32)
  mask = jnp.zeros(w.size, bool).at[kept].set(True).reshape(w.shape)
  lo = jnp.min(jnp.where(mask, jnp.inf, w), axis=0)
  hi = jnp.max(jnp.where(mask, -jnp.inf, w), axis=0)
  inside = jnp.where(jnp.isfinite(lo), jnp.clip(w, lo, hi), w)  # a channel all kept: as it is
  w = jnp.where(mask, inside, w)
  h = jnp.where(mask, 0.0, jnp.ones(w.shape, jnp.float32) if h is None else h)
  return kept, w, h


def _shard_by_shard(weight, importance, num_clusters, sharding, chunk_values, name,
                    channel_axes, options) -> ClusteredArray:
  names = sharding_lib.channel_split(name, jnp.shape(weight), sharding, 0, channel_axes)
  if names is None:
    raise ValueError(f"{name} is split over devices along axes other than its output channels "
                     f"({sharding.spec}); cluster_per_channel runs shard by shard only on weights "
                     "split along their (first) output-channel axis: reshard it.")
  if importance is not None and sharding_lib.named_sharding(importance) != sharding:
    warnings.warn(f"cluster_per_channel: the importance of {name} is not sharded like the "
                  "weight; resharding it.", stacklevel=3)
    importance = jax.device_put(importance, sharding)

  def local(*arrays):
    w, h = arrays if importance is not None else (arrays[0], None)
    q = cluster_per_channel(w, h, num_clusters, chunk_values=chunk_values, name=name,
                            channel_axes=channel_axes, **options)
    return q.codebook, q.indices

  args = (weight,) if importance is None else (weight, importance)
  run = sharding_lib.shard_local(local, sharding, (sharding.spec,) * len(args),
                                 (sharding_lib.codebook_spec(names, 2), sharding.spec))
  return ClusteredArray(*run(*args))


def stream_per_channel(matrices: Iterable, num_clusters: int = 16, *,
                       chunk_values: int = DEFAULT_CHUNK_VALUES,
                       **options) -> Iterator[tuple[str, ClusteredArray]]:
  """Clusters ``(name, weight, importance)`` triples one at a time, yielding ``(name, result)``.

  ``matrices`` may be a generator that loads each matrix (or each decoder
  layer's matrices) only when asked, so memory holds one matrix, its
  importance and the results not yet consumed. See :func:`cluster_per_channel`
  for the rest.
  """
  for item in matrices:
    try:
      name, weight, importance = item
    except (TypeError, ValueError):
      raise ValueError("stream_per_channel takes (name, weight, importance) triples; "
                       f"got {type(item).__name__}.") from None
    result = cluster_per_channel(weight, importance, num_clusters, chunk_values=chunk_values,
                                 name=name, **options)
    yield name, jax.block_until_ready(result)
