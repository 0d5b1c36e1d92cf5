"""Uniform quantization-aware training and binarized weights, stored as codebooks.

Uniform (Jacob et al., CVPR 2018): each output channel's weights (the last
axis; or the whole tensor) are mapped to ``2**bits`` evenly spaced levels
spanning ``[min(w, 0), max(w, 0)]``, with the zero point nudged so 0 is a
level. Binary (Courbariaux et al., with XNOR-Net's per-layer scale): every
weight becomes ``+scale`` or ``-scale``, ``scale = mean |w|``.

For training, :func:`fake_quantize` / :func:`fake_binarize` replace the
selected kernels by their quantized values inside the loss; the gradient
passes straight through (the straight-through estimator: d q(w) / d w = 1),
so the float weights keep learning. Use them on the params inside the loss
function (or wrap the model's apply function). The forward values are exact:
the same numbers :func:`uniform_codebooks` / :func:`binary_codebooks` store.

Storage: a uniform quantizer *is* a codebook: the levels of each channel form
a ``(C, 2**bits)`` codebook and the integer codes are the indices, so
:func:`gkq_jax.save` writes a QAT model in the same file format as a
k-means-shared one, and :func:`gkq_jax.dequantize` gives back exactly the
weights the fake-quantized forward used. The levels are computed as
``(i - zero) * spacing`` (one rounding), exactly the grid the file stores as
two numbers per channel instead of ``2**bits`` table entries.

BatchNorm folding (Jacob et al.: "the batch normalization parameters are
folded into the weights before quantization"): pass ``fold_scales``, the
per-output-channel factor ``gamma / sqrt(var + eps)`` (:func:`batchnorm_scale`)
the following BatchNorm multiplies the conv's output by. The folded kernel
``w * s`` is quantized and divided back by ``s``, so the model keeps its
BatchNorm and the folded kernel an inference engine would compute has
``2**bits`` values per channel.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from gkq_jax._paths import map_with_paths
from gkq_jax.clustered import ClusteredArray

KERNELS = r"(^|/)kernel$"


def _check_bits(bits) -> int:
  if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
    raise ValueError(f"bits must be an int in 1..16, got {bits!r}.")
  return bits


def batchnorm_scale(scale, var, epsilon: float = 1e-5) -> jax.Array:
  """The per-channel factor a BatchNorm multiplies its input by at inference."""
  return jnp.asarray(scale) / jnp.sqrt(jnp.asarray(var) + epsilon)


def _affine(w, bits: int, per_channel: bool):
  """(codes, zero point, step): w ~ (codes - zero point) * step."""
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  lo = jnp.minimum(jnp.min(w, axis=axes), 0.0)
  hi = jnp.maximum(jnp.max(w, axis=axes), 0.0)
  top = 2 ** bits - 1
  step = (hi - lo) / top
  step = jnp.where(step > 0, step, 1.0)
  zero = jnp.clip(jnp.round(-lo / step), 0, top)
  codes = jnp.clip(jnp.round(w / step) + zero, 0, top)
  return codes, zero, step


def _uniform_values(w, fold, bits, per_channel):
  codes, zero, step = _affine(w * fold, bits, per_channel)
  # One multiplication by the level spacing: the levels are then exactly the grid
  # (i - zero) * spacing, which the file stores as two numbers per channel.
  return (codes - zero) * (step / fold)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _uniform_ste(w, fold, bits, per_channel):
  return _uniform_values(w, fold, bits, per_channel)


@_uniform_ste.defjvp
def _uniform_ste_jvp(bits, per_channel, primals, tangents):
  w, fold = primals
  return _uniform_ste(w, fold, bits, per_channel), tangents[0]


def _binary_values(w):
  scale = jnp.mean(jnp.abs(w))
  return jnp.where(w >= 0, scale, -scale)


@jax.custom_jvp
def _binary_ste(w):
  return _binary_values(w)


@_binary_ste.defjvp
def _binary_ste_jvp(primals, tangents):
  return _binary_ste(primals[0]), tangents[0]


def _fold(w, fold_scale):
  if fold_scale is None:
    return jnp.ones(w.shape[-1], w.dtype)
  fold_scale = jnp.asarray(fold_scale, w.dtype)
  if fold_scale.shape != (w.shape[-1],):
    raise ValueError(f"fold_scale must have one entry per output channel ({w.shape[-1]},); "
                     f"got shape {fold_scale.shape}.")
  return fold_scale


def uniform_fake_quant(w, bits: int, *, per_channel: bool = True, fold_scale=None) -> jax.Array:
  """``w`` on its ``2**bits`` uniform levels (per output channel), straight-through gradient."""
  bits = _check_bits(bits)
  w = jnp.asarray(w)
  return _uniform_ste(w, jax.lax.stop_gradient(_fold(w, fold_scale)), bits, per_channel)


def binary_fake_quant(w) -> jax.Array:
  """``sign(w) * mean|w|`` (0 maps to +), straight-through gradient."""
  return _binary_ste(jnp.asarray(w))


def uniform_codebook(w, bits: int, *, per_channel: bool = True,
                     fold_scale=None) -> ClusteredArray:
  """The ClusteredArray (one codebook of ``2**bits`` levels per output channel)
  whose dequantized values equal :func:`uniform_fake_quant`'s output."""
  bits = _check_bits(bits)
  w = jnp.asarray(w, jnp.float32)
  fold = _fold(w, fold_scale)
  codes, zero, step = _affine(w * fold, bits, per_channel)
  levels = jnp.arange(2 ** bits, dtype=w.dtype)
  if not per_channel and fold_scale is None:  # one codebook for the tensor
    book = ((levels - zero) * (step / fold[0]))[None, :]
    return ClusteredArray(book, codes.astype(jnp.uint8 if bits <= 8 else jnp.uint16))
  channels = w.shape[-1]
  spacing = jnp.broadcast_to(step, (channels,)) / fold
  book = ((levels[None, :] - jnp.broadcast_to(zero, (channels,))[:, None])
          * spacing[:, None])
  dtype = jnp.uint8 if bits <= 8 else jnp.uint16
  return ClusteredArray(book, codes.astype(dtype))


def binary_codebook(w) -> ClusteredArray:
  """The ClusteredArray (codebook ``[-scale, +scale]``) of :func:`binary_fake_quant`."""
  w = jnp.asarray(w, jnp.float32)
  scale = jnp.mean(jnp.abs(w))
  return ClusteredArray(jnp.stack([-scale, scale])[None, :], (w >= 0).astype(jnp.uint8))


def _selected(path: str, leaf, pattern: str, min_ndim: int) -> bool:
  return jnp.ndim(leaf) >= min_ndim and re.search(pattern, path) is not None


def _map_selected(fn, params, pattern, min_ndim):
  hits = []

  def visit(path, leaf):
    if _selected(path, leaf, pattern, min_ndim):
      hits.append(path)
      return fn(path, leaf)
    return leaf

  out = map_with_paths(visit, params)
  if not hits:
    raise ValueError(f"pattern {pattern!r} selects no parameter with ndim >= {min_ndim}.")
  return out


def fake_quantize(params: Any, bits: int, *, pattern: str = KERNELS, min_ndim: int = 2,
                  per_channel: bool = True,
                  fold_scales: Mapping[str, Any] | None = None) -> Any:
  """``params`` with every selected leaf (path ``re.search``-es ``pattern``,
  ndim >= ``min_ndim``) uniformly fake-quantized; ``fold_scales`` maps a leaf's
  path to its BatchNorm factor (see the module docstring)."""
  _check_bits(bits)
  folds = dict(fold_scales or {})
  return _map_selected(lambda p, w: uniform_fake_quant(w, bits, per_channel=per_channel,
                                                       fold_scale=folds.get(p)),
                       params, pattern, min_ndim)


def fake_binarize(params: Any, *, pattern: str = KERNELS, min_ndim: int = 2) -> Any:
  """``params`` with every selected leaf binarized (straight-through gradient)."""
  return _map_selected(lambda p, w: binary_fake_quant(w), params, pattern, min_ndim)


def uniform_codebooks(params: Any, bits: int, *, pattern: str = KERNELS, min_ndim: int = 2,
                      per_channel: bool = True,
                      fold_scales: Mapping[str, Any] | None = None) -> Any:
  """``params`` with every selected leaf a ClusteredArray of its uniform levels."""
  _check_bits(bits)

  def build(params, folds):
    return _map_selected(lambda p, w: uniform_codebook(w, bits, per_channel=per_channel,
                                                       fold_scale=folds.get(p)),
                         params, pattern, min_ndim)

  # One compiled call for the whole tree, not one per operation and shape.
  return jax.jit(build)(params, dict(fold_scales or {}))


def binary_codebooks(params: Any, *, pattern: str = KERNELS, min_ndim: int = 2) -> Any:
  """``params`` with every selected leaf a ClusteredArray of ``[-scale, +scale]``."""
  build = lambda params: _map_selected(lambda p, w: binary_codebook(w), params, pattern,
                                       min_ndim)
  return jax.jit(build)(params)
