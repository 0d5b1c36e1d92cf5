"""Compression where sharded weights lie: per-channel work on each device's own channels.

A large model's kernels are sharded over a mesh of devices, typically along
their output features (``NamedSharding(mesh, P(None, "model"))``). Per-channel
clustering needs nothing from other devices: every output channel is a group
of its own, and a group's codebook is the one it gets alone. So
:func:`gkq_jax.quantize` (``granularity="channel"``) and
:func:`gkq_jax.cluster_per_channel` run such a leaf under ``shard_map``, each
device clustering the channels it holds; the indices come back sharded like
the weight and the codebooks along the same mesh axis, bit for bit what one
device computes, and no weight-sized array crosses devices.

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


def _axis_size(mesh, names) -> int:
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
  if shape[first] % _axis_size(sharding.mesh, names):
    raise ValueError(f"{name}: its channel axis of {shape[first]} does not split evenly over "
                     f"mesh axis {names!r} of {_axis_size(sharding.mesh, names)} devices; "
                     "pad the layer's features to a multiple or shard it on another mesh axis.")
  return names


def shard_local(fn: Callable, sharding: NamedSharding, in_specs, out_specs) -> Callable:
  """``fn`` run by every device on its own shards (``jax.shard_map``), jitted.

  The per-group clusterer's loops carry values that differ per device, which
  shard_map's replication check would reject although nothing is reduced
  across devices; hence ``check_vma=False``.
  """
  return jax.jit(jax.shard_map(fn, mesh=sharding.mesh, in_specs=in_specs,
                               out_specs=out_specs, check_vma=False))


def codebook_spec(names, ndim: int) -> P:
  """A per-channel codebook's spec: (C, k) or (R, C, k), split on its channel axis."""
  return P(names, None) if ndim == 2 else P(None, names, None)
