"""Streamed passes over the values of grouped 1-D k-means, row chunk by chunk.

The values are read as rows of a (rows, width) matrix in which every group
owns whole rows (see :mod:`gkq_jax._layout`); each pass is a ``lax.scan`` over
chunks of rows, so its working memory is one chunk whatever the number of
values. Per-group quantities reach a row by one gather per row, never per
value, and nearest-centroid assignment compares each value with its group's
sorted midpoints: no N x K array and no per-value group id.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gkq_jax import _histogram as hist_lib
from gkq_jax._layout import Arrays, Plan

# Up to this many clusters a value is placed by counting the midpoints below
# it (K - 1 fused comparisons); beyond, by binary search over them.
_MAX_COUNTING_CLUSTERS = 32


class Chunk(NamedTuple):
  group: jax.Array  # (C,) group of each row (num_groups for filler rows)
  x: jax.Array  # (C, W) values, padding repeats the row's last real value
  h: jax.Array  # (C, W) importance, 0 on padding
  valid: jax.Array  # (C, W) bool


def _scan_inputs(plan: Plan, arrays: Arrays):
  n = plan.num_rows // plan.chunk_rows
  split = lambda a: a.reshape(n, plan.chunk_rows)
  return split(arrays.row_group), split(arrays.row_start), split(arrays.row_count)


def _chunk(plan, x, h, uniform, rows):
  group, start, count = rows
  col = jnp.arange(plan.width)
  valid = col[None, :] < count[:, None]
  idx = start[:, None] + jnp.minimum(col[None, :], jnp.maximum(count[:, None] - 1, 0))
  hr = jnp.where(valid, jnp.where(_pad(uniform, False)[group][:, None], 1.0, h[idx]), 0.0)
  return Chunk(group, x[idx], hr, valid)


def _pad(a, value):
  """Per-group array with one extra entry for the filler rows' group."""
  return jnp.concatenate([a, jnp.full((1,) + a.shape[1:], value, a.dtype)])


def _map_chunks(fn, plan, arrays, x, h, uniform):
  """Stacks fn(chunk) over all chunks, (num_chunks, ...) outputs."""
  return jax.lax.map(lambda rows: fn(_chunk(plan, x, h, uniform, rows)),
                     _scan_inputs(plan, arrays))


def _fold_chunks(fn, init, plan, arrays, x, h, uniform):
  """carry = fn(carry, chunk) over all chunks."""
  def body(carry, rows):
    return fn(carry, _chunk(plan, x, h, uniform, rows)), None
  return jax.lax.scan(body, init, _scan_inputs(plan, arrays))[0]


def group_stats(plan: Plan, arrays: Arrays, x, h, axis_name=None):
  """Per-group (min, max, importance mass) of the real values; with
  ``axis_name`` (inside ``shard_map``), of the groups' parts on every device."""
  no_uniform = jnp.zeros((plan.num_groups,), bool)

  def row_stats(c):
    return c.x.min(axis=1), c.x.max(axis=1), c.h.sum(axis=1)

  lo, hi, mass = (a.reshape(-1) for a in _map_chunks(row_stats, plan, arrays, x, h, no_uniform))
  G = plan.num_groups + 1
  seg = dict(segment_ids=arrays.row_group, num_segments=G, indices_are_sorted=True)
  lo, hi, mass = (jax.ops.segment_min(lo, **seg)[:-1], jax.ops.segment_max(hi, **seg)[:-1],
                  jax.ops.segment_sum(mass, **seg)[:-1])
  if axis_name is None:
    return lo, hi, mass
  return (jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name),
          jax.lax.psum(mass, axis_name))


def histogram(plan: Plan, arrays: Arrays, frame: hist_lib.Frame, x, h, axis_name=None):
  """Every group's histogram: the flat (total_bins, 2) buffer of (mass, first
  moment) filled by one scatter per chunk, and its running sums. With
  ``axis_name``, the buffers of the groups' parts on every device summed: a
  histogram crosses devices, never the values."""
  center, half = _pad(frame.center, 0.0), _pad(frame.half_range, 0.0)
  bins = _pad(arrays.bins, 1)
  scale = hist_lib.bin_scale(half, bins)
  base = _pad(arrays.hist_base, 0)

  def add(sums, c):
    g = c.group[:, None]
    xc = c.x - center[g]
    b = (base[g] + hist_lib.bin_index(xc, half[g], scale[g], bins[g])).reshape(-1)
    # Two one-column scatters: XLA's CPU scatter of (mass, moment) pairs costs
    # about twice as much as both columns scattered apart.
    weight, moment = sums
    return (weight.at[b].add(c.h.reshape(-1), mode="promise_in_bounds"),
            moment.at[b].add((c.h * xc).reshape(-1), mode="promise_in_bounds"))

  zeros = jnp.zeros((plan.total_bins,), jnp.float32)
  weight, moment = _fold_chunks(add, (zeros, zeros), plan, arrays, x, h, frame.uniform)
  if axis_name is not None:
    weight, moment = jax.lax.psum((weight, moment), axis_name)
  return hist_lib.make_histogram(weight, moment, arrays.hist_base, arrays.bins,
                                 frame.half_range, arrays.first_tile)


def _midpoints(c):
  """(G, K + 1): cluster k owns the values in (mid[k], mid[k + 1]]."""
  G = c.shape[0]
  mid = (c[:, :-1] + c[:, 1:]) / 2
  return jnp.concatenate([jnp.full((G, 1), -jnp.inf), mid, jnp.full((G, 1), jnp.inf)], axis=1)


def _assign_chunk(xc, mid):
  """Nearest centroid of each value of a chunk, given each row's midpoints."""
  K = mid.shape[1] - 1
  inner = mid[:, 1:K]
  if K <= _MAX_COUNTING_CLUSTERS:
    return (xc[:, :, None] > inner[:, None, :]).sum(-1, dtype=jnp.int32)
  lo = jnp.zeros(xc.shape, jnp.int32)  # answer in [lo, lo + span]
  span = 1 << (K - 1).bit_length()
  while span > 1:
    span //= 2
    probe = jnp.minimum(lo + span, K - 1)
    above = xc > jnp.take_along_axis(inner, probe - 1, axis=1)
    lo = jnp.where(above & (probe > lo), probe, lo)
  return lo


def assign(plan: Plan, arrays: Arrays, frame: hist_lib.Frame, x, h, c):
  """(N,) index of the nearest centroid of each value's own group; ``c`` is
  relative to the group centres, sorted, +inf in unused slots."""
  center = _pad(frame.center, 0.0)
  mid = _pad(_midpoints(c), 0.0)

  def rows(ch):
    return _assign_chunk(ch.x - center[ch.group][:, None], mid[ch.group])

  a = _map_chunks(rows, plan, arrays, x, h, frame.uniform).reshape(-1)
  if plan.padded:
    return a[arrays.out_index]
  return a[:plan.num_values]


def cluster_sums(plan: Plan, arrays: Arrays, frame: hist_lib.Frame, x, h, c, axis_name=None):
  """(G, K) importance mass and first moment (relative to the centre) of the
  values nearest to each centroid: one Lloyd update's statistics (with
  ``axis_name``, summed over the groups' parts on every device)."""
  G, K = c.shape
  center = _pad(frame.center, 0.0)
  mid = _pad(_midpoints(c), 0.0)

  def add(sums, ch):
    xc = ch.x - center[ch.group][:, None]
    cluster = (ch.group[:, None] * K + _assign_chunk(xc, mid[ch.group])).reshape(-1)
    weight, moment = sums  # one-column scatters, as in histogram()
    return (weight.at[cluster].add(ch.h.reshape(-1), mode="promise_in_bounds"),
            moment.at[cluster].add((ch.h * xc).reshape(-1), mode="promise_in_bounds"))

  zeros = jnp.zeros(((G + 1) * K,), jnp.float32)
  sums = _fold_chunks(add, (zeros, zeros), plan, arrays, x, h, frame.uniform)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return tuple(a[:G * K].reshape(G, K) for a in sums)
