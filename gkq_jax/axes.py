"""How a weight's axes are read: its layer's output features, and a stack of layers.

A parameter tree does not say which axes of a kernel are its layer's outputs:
a Dense kernel is (inputs, outputs), but attention's q projection written as
``DenseGeneral((heads, head_dim))`` is (d, heads, head_dim) and its output
projection ``DenseGeneral(d, axis=(-2, -1))`` is (heads, head_dim, d). Nor does
it say that a kernel of ``nn.scan``'s stacked layers is (layers, ...).
:class:`LeafAxes` says both; :func:`layer_axes` reads them off a linen or nnx
model, and :func:`gkq_jax.quantize` takes them as ``axes=``:

    q = gkq.quantize(params, imp, rules, granularity="channel",
                     axes=gkq.layer_axes(model, x))

* ``channels``: the trailing axes that are the layer's output features. With
  ``granularity="channel"`` every output feature gets its own codebook (the
  (d, heads, head_dim) kernel gets heads x head_dim codebooks, as the same
  projection written as ``Dense(heads * head_dim)``); a kernel with several
  input axes (the (heads, head_dim, d) output projection) has d codebooks, each
  over all its heads x head_dim inputs.
* ``stacked``: the leading axes that stack layers. Each layer's slice is
  clustered on its own, as the unscanned layer would be (per layer: a
  codebook per slice; per channel: a codebook per slice and output feature),
  and :func:`gkq_jax.apply_packed` runs the stack from packed weights, each
  step dequantizing its own slice.

The rule: linen ``Dense``, ``Conv``, ``ConvTranspose`` and nnx ``Linear``,
``Conv``: one output axis; ``DenseGeneral`` / ``LinearGeneral``: all of
``features`` / ``out_features``; other layers (``Einsum``, ``Embed``, custom
modules): one output axis, the last, unless a rule says otherwise
(``ClusterRule(..., channel_axes=2)``). Stacked axes are found by comparing
each parameter's shape inside its module with its shape in the tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
from flax import nnx

from gkq_jax._paths import named_leaves


@dataclasses.dataclass(frozen=True)
class LeafAxes:
  """How one parameter's axes are read (see the module docstring)."""

  stacked: int = 0  # leading axes that stack layers
  channels: int = 1  # trailing axes that are the layer's output features


def _feature_axes(module) -> int:
  """Trailing output axes of a layer's kernel, by the layer's own type."""
  if isinstance(module, nn.DenseGeneral):
    features = module.features
    return len(features) if isinstance(features, (tuple, list)) else 1
  if isinstance(module, nnx.LinearGeneral):
    return len(module.out_features)
  return 1


def _linen_axes(model: nn.Module, args, kwargs) -> dict[str, LeafAxes]:
  inside: dict[tuple, tuple] = {}  # (module path + name) -> (shape seen by the module, channels)

  def interceptor(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    module = context.module
    if context.method_name == "__call__" and module.scope is not None:
      params = module.variables.get("params", {})
      for name, value in params.items():
        if hasattr(value, "shape"):
          channels = _feature_axes(module) if name == "kernel" else 1
          inside[tuple(module.path) + (name,)] = (tuple(value.shape), channels)
    return out

  with nn.intercept_methods(interceptor):
    shapes = jax.eval_shape(lambda *a: model.init(jax.random.PRNGKey(0), *a, **kwargs), *args)
  found = {}
  for path, leaf in named_leaves(shapes.get("params", {})):
    seen = inside.get(tuple(path.split("/")))
    if seen is not None:
      found[path] = LeafAxes(len(leaf.shape) - len(seen[0]), seen[1])
  return found


def _expected_ndim(module) -> int | None:
  """The number of axes a layer's kernel has when it is not stacked (None: unknown)."""
  if getattr(module, "kernel_shape", None) is not None:
    return len(module.kernel_shape)
  if isinstance(module, nnx.LinearGeneral):
    return len(module.batch_axis) + len(module.in_features) + len(module.out_features)
  if isinstance(module, nnx.Linear):
    return 2
  return None


def _nnx_axes(model: nnx.Module) -> dict[str, LeafAxes]:
  found = {}
  for path, module in nnx.iter_modules(model):
    kernel = getattr(module, "kernel", None)
    expected = _expected_ndim(module)
    if not isinstance(kernel, nnx.Variable) or expected is None:
      continue
    stacked = kernel.get_value().ndim - expected
    prefix = "/".join(str(p) for p in path)
    for name, value in vars(module).items():
      if isinstance(value, nnx.Param):
        channels = _feature_axes(module) if name == "kernel" else 1
        found[f"{prefix}/{name}" if prefix else name] = LeafAxes(stacked, channels)
  return found


def layer_axes(model: Any, *args, **kwargs) -> dict[str, LeafAxes]:
  """{parameter path: :class:`LeafAxes`} of a linen model (with example
  inputs, traced abstractly: nothing is computed) or of an nnx module.

  Paths are relative to the params collection (linen: ``layers/q/kernel``,
  nnx: the state's ``blocks/0/attn/q/kernel``); :func:`gkq_jax.quantize`
  matches them against the end of its own paths, so a tree with a ``params``
  level above works too. Parameters of layers the rule does not know are left
  out (they take the defaults).
  """
  if isinstance(model, nnx.Module):
    if args or kwargs:
      raise ValueError("layer_axes(nnx_module) reads the module itself; pass no inputs.")
    return _nnx_axes(model)
  if isinstance(model, nn.Module):
    return _linen_axes(model, args, kwargs)
  raise TypeError(f"layer_axes takes a flax.linen Module (with example inputs) or an "
                  f"nnx.Module, got {type(model).__name__}.")


def axes_for(path: str, shape: tuple, rule, axes: Mapping[str, LeafAxes] | None) -> LeafAxes:
  """The axes of one parameter: the rule's where it sets them, else ``axes``'
  entry whose path ends ``path`` (or equals it), else the defaults."""
  found = LeafAxes()
  if axes:
    for key, value in axes.items():
      if path == key or path.endswith("/" + key):
        found = value
        break
  if rule is not None:
    found = LeafAxes(found.stacked if rule.stacked_axes is None else rule.stacked_axes,
                     found.channels if rule.channel_axes is None else rule.channel_axes)
  if found.stacked + found.channels > max(len(shape), 1) and shape:
    raise ValueError(f"{path}: {found.stacked} stacked and {found.channels} channel axes do "
                     f"not fit its shape {tuple(shape)}; check the rule's channel_axes / "
                     "stacked_axes or the axes passed to quantize.")
  return found
