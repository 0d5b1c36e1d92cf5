"""Round-to-nearest (RTN) uniform quantization, the baseline every table compares with.

Each output channel (or each group of ``group_size`` input rows of a channel)
gets ``2**bits`` evenly spaced levels; every weight is rounded to the nearest.
The levels span the group's range:

  * ``clip="minmax"``: from the group's minimum to its maximum (asymmetric,
    the integer quantizers of GPTQ's and SqueezeLLM's RTN rows), widened to hold 0
    with 0 a level (an integer zero point, as GPTQ's quantizer);
  * ``clip="mse"``: the range shrunk towards the group's centre by the factor
    in ``CLIP_FACTORS`` that gives the least squared error (importance-weighted
    when ``importance`` is given), the grid search AWQ and GPTQ's code use.

The result is a :class:`~gkq_jax.ClusteredArray` per selected leaf whose
codebook holds the grid's levels, so RTN models go through
:func:`gkq_jax.dequantize`, the file and the packed runtime exactly as
clustered ones do, and their bytes are counted the same way.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gkq_jax import rules as rules_lib
from gkq_jax._paths import named_leaves
from gkq_jax.axes import LeafAxes, axes_for
from gkq_jax.clustered import ClusteredArray, index_dtype

CLIPS = ("minmax", "mse")
CLIP_FACTORS = tuple(float(f) for f in np.round(np.arange(1.0, 0.49, -0.025), 3))


@functools.partial(jax.jit, static_argnames=("levels", "clip"))
def _grid(w, h, *, levels: int, clip: str):
  """Per row of ``w`` (R, n): (codebook (R, levels), indices (R, n) int32)."""
  lo, hi = jnp.min(w, axis=1), jnp.max(w, axis=1)

  def quantize(factor):
    cut = (hi - lo) * (1 - factor) / 2  # factor 1: the range itself, exactly
    # The range widened to hold 0 and the grid shifted by a whole number of steps so
    # that 0 is a level (GPTQ's integer zero point): the grid is then two numbers per
    # row in the file, (i - zero) * step, rebuilt bit for bit.
    a, b = jnp.minimum(lo + cut, 0.0), jnp.maximum(hi - cut, 0.0)
    step = jnp.where(b > a, (b - a) / (levels - 1), 1.0)
    zero = jnp.round(-a / step)
    book = (jnp.arange(levels, dtype=w.dtype)[None, :] - zero[:, None]) * step[:, None]
    idx = jnp.clip(jnp.round(w / step[:, None] + zero[:, None]), 0, levels - 1)
    err = jnp.sum(h * (jnp.take_along_axis(book, idx.astype(jnp.int32), 1) - w) ** 2, axis=1)
    return book, idx.astype(jnp.int32), err

  if clip == "minmax":
    book, idx, _ = quantize(1.0)
    return book, idx
  books, idxs, errs = jax.lax.map(quantize, jnp.asarray(CLIP_FACTORS, w.dtype))
  best = jnp.argmin(errs, axis=0)  # per row; ties go to the widest range
  rows = jnp.arange(w.shape[0])
  return books[best, rows], idxs[best, rows]


def rtn_array(weight, bits: int, *, importance=None, group_size: int | None = None,
              clip: str = "minmax", axes: LeafAxes = LeafAxes(), per_channel: bool = True,
              name: str = "weight") -> ClusteredArray:
  """One array quantized to ``2**bits`` uniform levels per output channel (the
  trailing ``axes.channels`` axes), per group of ``group_size`` input rows of a
  channel, or per tensor (``per_channel=False``); stacked layers (``axes.stacked``)
  each on their own."""
  if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
    raise ValueError(f"{name}: bits must be an int in 1..16, got {bits!r}.")
  if clip not in CLIPS:
    raise ValueError(f"{name}: clip={clip!r} is not one of {CLIPS}.")
  w = jnp.asarray(weight, jnp.float32)
  shape = w.shape
  layers = int(np.prod(shape[:axes.stacked]))
  channels = int(np.prod(shape[len(shape) - axes.channels:])) if per_channel else 1
  fan_in = w.size // (layers * channels)
  if group_size is not None:
    if not per_channel or fan_in % group_size:
      raise ValueError(f"{name}: group_size={group_size} must divide the {fan_in} input rows "
                       f"of each channel (shape {shape}), per channel.")
    groups = fan_in // group_size
  else:
    groups = 1
  # Rows (layer, row group, channel), each holding one codebook's weights.
  rows = w.reshape(layers, groups, fan_in // groups, channels).transpose(0, 1, 3, 2)
  h = jnp.ones_like(w) if importance is None else jnp.asarray(importance, jnp.float32)
  hrows = h.reshape(layers, groups, fan_in // groups, channels).transpose(0, 1, 3, 2)
  book, idx = _grid(rows.reshape(-1, fan_in // groups), hrows.reshape(-1, fan_in // groups),
                    levels=2 ** bits, clip=clip)
  idx = idx.reshape(layers, groups, channels, -1).transpose(0, 1, 3, 2).reshape(shape)
  prefix = (channels,) if layers * groups == 1 else (layers * groups, channels)
  return ClusteredArray(book.reshape(prefix + (2 ** bits,)), idx.astype(index_dtype(2 ** bits)),
                        dtype=np.dtype(jnp.result_type(weight)), stacked=axes.stacked)


def rtn_quantize(params: Any, bits: int, rules: Sequence[rules_lib.ClusterRule] = (
    rules_lib.ClusterRule(),), *, importance: Any = None, group_size: int | None = None,
                 clip: str = "minmax", per_channel: bool = True,
                 axes: Mapping[str, LeafAxes] | None = None) -> Any:
  """RTN of every leaf the rules select (their K is ignored: ``2**bits`` levels);
  the tree comes back with :class:`~gkq_jax.ClusteredArray` leaves, as
  :func:`gkq_jax.quantize` returns. ``axes`` as in :func:`gkq_jax.quantize`."""
  rules_lib.check_rules(params, rules)
  imps = {} if importance is None else dict(named_leaves(importance))
  out = []
  for path, leaf in named_leaves(params):
    rule = rules_lib.rule_for(rules, path)
    layout = axes_for(path, jnp.shape(leaf), rule, axes)
    selected = (rule is not None and rule.num_clusters > 0
                and jnp.ndim(leaf) - layout.stacked >= rule.min_ndim
                and jax.dtypes.issubdtype(jnp.result_type(leaf), jnp.floating))
    out.append(rtn_array(leaf, bits, importance=imps.get(path), group_size=group_size,
                         clip=clip, axes=layout, per_channel=per_channel, name=path)
               if selected else leaf)
  return jax.tree_util.tree_unflatten(jax.tree.structure(params), out)
