"""Compression where sharded weights lie: no weight gathered onto one device.

A large model's kernels are sharded over a mesh of devices, typically along
their output features (``NamedSharding(mesh, P(None, "model"))``). Per-channel
clustering needs nothing from other devices: every output channel is a group
of its own, and a group's codebook is the one it gets alone. So
:func:`gkq_jax.quantize` (``granularity="channel"``) and
:func:`gkq_jax.cluster_per_channel` run such a leaf under ``shard_map``, each
device clustering the channels it holds (a block of them at a time); the
indices come back sharded like the weight and the codebooks along the same
mesh axis, bit for bit what one device computes.

Per-layer clustering (``granularity="layer"``) of a leaf split along any axes
adds, over the devices holding its parts, what the histogram clusterer needs:
ranges, weighted histograms and per-cluster sums (:mod:`gkq_jax._split_groups`),
never the values; the codebook is replicated, the indices stay where their
weights are.

The rest follows the arrays' shardings without gathering: dequantizing reads
each channel's codebook along its own axis, and fine-tuning
(:func:`gkq_jax.share_centroids`, :func:`gkq_jax.refresh_codebooks`) reduces
per-cluster sums into codebook-sized tables.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def named_sharding(x) -> NamedSharding | None:
  """``x``'s NamedSharding when it is split over more than one device, else None
  (also for tracers: inside ``jit`` / ``shard_map`` an array is what it is)."""
  if isinstance(x, jax.core.Tracer):
    return None
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, NamedSharding) or sharding.is_fully_replicated:
    return None
  return sharding


def _spec(sharding: NamedSharding, ndim: int) -> tuple:
  spec = tuple(sharding.spec)
  return spec + (None,) * (ndim - len(spec))


def axis_size(mesh, names) -> int:
  names = names if isinstance(names, tuple) else (names,)
  return math.prod(mesh.shape[n] for n in names)


def channel_split(name: str, shape: tuple, sharding: NamedSharding, stacked: int,
                  channel_axes: int):
  """The mesh axis (or axes) splitting a leaf's output channels, or None when
  the leaf is split along other axes too (then it cannot be clustered per
  channel shard by shard).

  The channels are the product of the trailing ``channel_axes`` axes; only the
  first of them may be split (so each device holds a contiguous block of
  channels), and it must split evenly.
  """
  spec = _spec(sharding, len(shape))
  first = len(shape) - channel_axes
  outside = [a for i, a in enumerate(spec) if a is not None and i != first]
  if outside or spec[first] is None:
    return None
  names = spec[first]
  if shape[first] % axis_size(sharding.mesh, names):
    raise ValueError(f"{name}: its channel axis of {shape[first]} does not split evenly over "
                     f"mesh axis {names!r} of {axis_size(sharding.mesh, names)} devices; "
                     "pad the layer's features to a multiple or shard it on another mesh axis.")
  return names


def split_axes(name: str, shape: tuple, sharding: NamedSharding, stacked: int) -> tuple:
  """The mesh axes splitting a leaf that is clustered per layer where it lies
  (its histograms are summed over them); its stacked layer axes must be whole
  on every device, and every split must be even."""
  spec = _spec(sharding, len(shape))
  for i, names in enumerate(spec):
    if names is None:
      continue
    if i < stacked:
      raise ValueError(f"{name}: its stacked layer axis {i} is split over mesh axis {names!r}; "
                       "per-layer clustering sums each layer's histogram over the devices "
                       "that hold its weights. Shard it along its weight axes instead (e.g. "
                       "P(None, ..., 'model')) or use granularity='channel'.")
    if shape[i] % axis_size(sharding.mesh, names):
      raise ValueError(f"{name}: its axis {i} of {shape[i]} does not split evenly over mesh "
                       f"axis {names!r} of {axis_size(sharding.mesh, names)} devices; pad it "
                       "to a multiple or shard it on another mesh axis.")
  flat = []
  for names in spec:
    if names is not None:
      flat.extend(names if isinstance(names, tuple) else (names,))
  return tuple(flat)


def gather(x, spec):
  """Inside shard_map: the whole array of which ``x`` is this device's part."""
  for axis, names in enumerate(spec):
    if names is not None:
      x = jax.lax.all_gather(x, names, axis=axis, tiled=True)
  return x


def own_part(x, spec):
  """Inside shard_map: this device's part of a whole array ``x`` split by ``spec``."""
  for axis, names in enumerate(spec):
    if names is not None:
      size = x.shape[axis] // jax.lax.axis_size(names)
      x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(names) * size, size, axis)
  return x


def shard_local(fn: Callable, sharding: NamedSharding, in_specs, out_specs, *,
                in_blocks: bool = False) -> Callable:
  """``fn`` run by every device on its own shards (``jax.shard_map``), jitted.

  The per-group clusterer's loops carry values that differ per device, which
  shard_map's replication check would reject although nothing is reduced
  across devices; hence ``check_vma=False``. ``in_blocks``: ``fn`` loops over
  blocks of its inputs to bound its working memory, so XLA must not hoist a
  conversion of a whole input out of that loop (its loop-invariant code
  motion turns a bfloat16 weight into a float32 copy of it ahead of the loop).
  """
  options = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"} if in_blocks else None
  return jax.jit(jax.shard_map(fn, mesh=sharding.mesh, in_specs=in_specs, out_specs=out_specs,
                               check_vma=False), compiler_options=options)


def codebook_spec(names, ndim: int) -> P:
  """A per-channel codebook's spec: (C, k) or (R, C, k), split on its channel axis."""
  return P(names, None) if ndim == 2 else P(None, names, None)
