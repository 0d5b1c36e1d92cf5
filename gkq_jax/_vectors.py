"""Convolution kernels seen as vectors: the layouts ``"vector"`` and ``"row"``.

A conv kernel (spatial axes..., in, out; HWIO for a 2-D conv) is cut into
short vectors that are clustered as wholes:

  * ``"vector"``: each spatial filter, all spatial axes (kh * kw values);
  * ``"row"``: each kernel row, the last spatial axis (kw values), as Deep
    k-Means shares them.

A layout is (vector axis, vector shape): the vector axes sit at
``vector_axis`` in the dense shape, consecutively; the remaining axes keep
their order and index the vectors (the ClusteredArray's ``indices`` shape).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

VECTOR_LAYOUTS = ("vector", "row")


def check_conv_kernel(path: str, shape, layout: str, parameter: str = "granularity") -> None:
  """Vectors exist only in conv kernels (ndim >= 3); a Dense kernel is an error."""
  if len(shape) < 3:
    what = "kernel rows" if layout == "row" else "spatial filters"
    raise ValueError(f"{parameter}={layout!r} clusters the {what} of conv kernels (ndim >= 3); "
                     f"{path} has shape {tuple(shape)} (a Dense kernel?). Narrow the rule's "
                     "pattern to conv kernels or raise its min_ndim to 3.")


def layout_of(shape, layout: str) -> tuple[int, tuple[int, ...]]:
  """(vector axis, vector shape) of a conv kernel of ``shape``."""
  ndim = len(shape)
  if layout == "vector":
    return 0, tuple(shape[:-2])
  if layout == "row":
    return ndim - 3, (shape[ndim - 3],)
  raise ValueError(f"layout {layout!r} is not one of {VECTOR_LAYOUTS}.")


def to_points(a, vector_axis: int, vector_shape) -> tuple:
  """(points (P, d), index shape) of array ``a``: the vectors as rows, in index order."""
  n = len(vector_shape)
  moved = jnp.moveaxis(a, tuple(range(vector_axis, vector_axis + n)), tuple(range(-n, 0)))
  rest = tuple(moved.shape[:-n])
  return moved.reshape((-1, int(np.prod(vector_shape)))), rest


def from_vectors(x, vector_axis: int, vector_shape):
  """Inverse of :func:`to_points` for ``x`` of shape (*index shape, d)."""
  n = len(vector_shape)
  x = x.reshape(tuple(x.shape[:-1]) + tuple(vector_shape))
  return jnp.moveaxis(x, tuple(range(-n, 0)), tuple(range(vector_axis, vector_axis + n)))
