"""Runs a user's flax.linen or nnx model straight from packed weights.

:func:`apply_packed` (linen) and :func:`merge_packed` (nnx) take the variables
with :class:`~gkq_jax.packing.PackedArray` leaves and leave the model's code as
it is. Each packed leaf reaches the model in a :class:`PackedParam` box that
dequantizes where the layer reads it: linen's ``self.param`` unboxes it (it is
a flax ``AxisMetadata``), nnx's ``variable[...]`` indexes it and ``jnp.asarray``
converts it. The model never holds a dense copy of all its weights.

Interception. XLA would happily compute every dequantization at the start of
the program, since none depends on the activations, and then hold all dense
weights at once. So every module call is intercepted (linen:
``nn.intercept_methods``; nnx: each module owning a packed weight gets a thin
subclass whose ``__call__`` does it) to note the layer's input, and the
dequantization of that layer's weights is made to depend on it. Each dense
copy then exists only while its layer runs.

The same interception routes ``nn.Dense`` / ``nnx.Linear`` layers to the
Pallas lookup-table kernel (:mod:`gkq_jax.lut_kernel`) when ``kernel="lut"``
(the default on a GPU); a layer the kernel cannot run falls back to the XLA
path with a warning that names it.

Stacks of layers (``nn.scan`` / ``nn.vmap`` over ``params`` axis 0) run from
packed weights when they were quantized with their stacked axis as layers
(:mod:`gkq_jax.axes`): the stack is packed layer by layer, the transform hands
each step its own layer's bytes and codebook, and the step dequantizes only
that slice.

Dense-and-sparse weights (a sparse part of weights kept exactly, from
``quantize(..., sparse_fraction=...)``): the XLA path dequantizes the weight
with its sparse part written in (as :func:`gkq_jax.dequantize`), so the
outputs are the dense dequantized model's; the LUT route multiplies the
clustered weight in the kernel and adds the kept weights as a sparse
correction (:func:`gkq_jax.lut_matmul`). A stack's part is split by layer
with its bytes.

Limits, each a clear error or a named fallback: a module that reads a packed
weight as an array in some other way (``.T``, ``@``, ...) gets the dense
weight there, with a warning naming it; a packed weight split by ``nn.scan`` /
``nn.vmap`` that was clustered as one array (or split along another axis) is
an error (quantize it per layer, or pass it in ``dense=``); a packed tree whose
shapes do not fit the model fails in flax's own shape check.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import warnings
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta
from jax import lax

from gkq_jax import lut_kernel as lut_lib
from gkq_jax import packing
from gkq_jax._paths import map_with_paths

KERNELS = ("auto", "xla", "lut")

_state = threading.local()


def _inputs() -> list:
  """Inputs of the layers being called in this thread, innermost last."""
  if not hasattr(_state, "inputs"):
    _state.inputs = []
  return _state.inputs


def _first_array(tree):
  """The first non-empty real or integer array among a call's arguments (None if none)."""
  for leaf in jax.tree.leaves(tree):
    if (isinstance(leaf, jax.Array) and leaf.size
        and (jnp.issubdtype(leaf.dtype, jnp.integer) or jnp.issubdtype(leaf.dtype, jnp.floating)
             or leaf.dtype == jnp.bool_)):
      return leaf
  return None


@contextlib.contextmanager
def _layer_input(args):
  x = _first_array(args)
  if x is not None:
    _inputs().append(x)
  try:
    yield
  finally:
    if x is not None:
      _inputs().pop()


def _after(array, x):
  """``array`` itself, but computable only once ``x`` exists.

  A slice of ``array`` padded by one row, of ``array``'s length, starting at
  ``min(int(x[0]), 0)``: with negative starts passed to XLA as they are
  (``allow_negative_indices=False``), XLA clamps every start into [0, 1], and a
  start at most 0 becomes 0 whatever ``x`` holds (NaN, inf, any sign), so the
  value never depends on the data. XLA cannot know that, so it must wait for
  ``x``. (JAX's default wraps a negative start like a Python index: -1 read
  the rows rotated by one, issue 26. An optimization barrier does not survive
  XLA's CPU pipeline.)
  """
  start = jnp.minimum(lax.convert_element_type(jnp.ravel(x)[0], jnp.int32), 0)
  padded = jnp.concatenate([array, array[:1]])
  return lax.dynamic_slice_in_dim(padded, start, array.shape[0], allow_negative_indices=False)


def _array_attributes() -> frozenset:
  return frozenset(n for n in dir(jax.Array) if not n.startswith("_"))


_ARRAY_ATTRIBUTES = _array_attributes()


class PackedParam(flax.struct.PyTreeNode, meta.AxisMetadata):
  """A packed weight on its way into a model; dequantized where it is read.

  ``name`` is the weight's path, used in warnings and errors.
  """

  array: packing.PackedArray
  name: str = flax.struct.field(pytree_node=False, default="")

  # ------------------------------------------------------------ reading it
  def dequantize(self) -> jax.Array:
    w = self.array
    stack = _inputs()
    if stack:
      # Tied to the input of the layer being called, this dense copy cannot be made before
      # that layer runs, so copies do not pile up. (The codebook suffices: XLA fuses the
      # unpacking into the gather that reads it.)
      w = w.replace(codebook=_after(w.codebook, stack[-1]))
    return w.dequantize()

  def unbox(self) -> jax.Array:  # linen's self.param
    return self.dequantize()

  def __getitem__(self, key):  # nnx's variable[...]
    return self.dequantize()[key]

  def __jax_array__(self):  # jnp.asarray
    return self.dequantize()

  @property
  def value(self) -> jax.Array:
    return self.dequantize()

  @property
  def shape(self) -> tuple:
    return self.array.shape

  @property
  def dtype(self):
    return self.array.dtype

  @property
  def ndim(self) -> int:
    return len(self.array.shape)

  @property
  def size(self) -> int:
    return math.prod(self.array.shape)

  def _fallback(self, how: str) -> jax.Array:
    warnings.warn(f"gkq_jax: {self.name or 'a packed weight'} is read as {how}, which does "
                  "not run from packed weights; that layer uses its dense weight "
                  "(dequantized there).", stacklevel=3)
    return self.dequantize()

  def __getattr__(self, attr):
    if attr in _ARRAY_ATTRIBUTES:
      return getattr(self._fallback(f"`.{attr}`"), attr)
    raise AttributeError(f"{type(self).__name__} has no attribute {attr!r}")

  def __matmul__(self, other):
    return self._fallback("`@`") @ other

  def __rmatmul__(self, other):
    return other @ self._fallback("`@`")

  def __mul__(self, other):
    return self._fallback("`*`") * other

  def __rmul__(self, other):
    return other * self._fallback("`*`")

  def __add__(self, other):
    return self._fallback("`+`") + other

  def __radd__(self, other):
    return other + self._fallback("`+`")

  def __sub__(self, other):
    return self._fallback("`-`") - other

  def __rsub__(self, other):
    return other - self._fallback("`-`")

  def __neg__(self):
    return -self._fallback("`-`")

  # ------------------------------------------------------ flax's AxisMetadata
  def replace_boxed(self, val):
    raise ValueError(f"{self.name}: packed weights are read-only; a model run with "
                     "apply_packed / merge_packed cannot update them.")

  def add_axis(self, index, params):
    return self  # the transform stacked the arrays back; the depth is read off them

  def remove_axis(self, index, params):
    # nn.scan / nn.vmap slice the arrays' leading axis; a stack packed layer by layer
    # (a ClusteredArray with stacked axes) is laid out for exactly that.
    if index != 0 or not self.array.stacked:
      raise self._scan_error(index)
    return self

  def _scan_error(self, index):
    if index != 0:
      why = (f"along axis {index}; packed stacks are split along their leading axis "
             "(variable_axes={'params': 0})")
    else:
      why = ("but it was clustered as one array; quantize it with its stacked axis as layers "
             "(quantize(..., axes=gkq.layer_axes(model, x)) or a rule's stacked_axes=1)")
    return ValueError(f"{self.name} is split by nn.scan / nn.vmap {why}, or run it from its "
                      f"dense weight with dense=({re.escape(self.name)!r},).")


def _box(tree: Any, dense: Sequence[str]) -> Any:
  """Packed leaves into PackedParam boxes; those matching ``dense`` dequantized now."""
  patterns = [re.compile(p) for p in dense]

  def box(path, x):
    if not packing.is_packed(x):
      return x
    if any(p.search(path) for p in patterns):
      return x.dequantize()
    return PackedParam(x, path)

  return map_with_paths(box, tree, is_leaf=packing.is_packed)


def _check_kernel(kernel: str) -> str:
  if kernel not in KERNELS:
    raise ValueError(f"kernel={kernel!r} is not one of {KERNELS}.")
  if kernel == "auto":
    return "lut" if jax.default_backend() == "gpu" else "xla"
  return kernel


# ------------------------------------------------------------ the LUT route

def _compute_dtype(x, box, bias, dtype):
  """The dtype a Dense layer computes in (flax's promote_dtype rule)."""
  return jnp.dtype(dtype or jnp.result_type(x, box.dtype, *([] if bias is None else [bias])))


def _lut_dense(x, box, bias, dtype):
  """What a Dense layer computes, with the kernel in the lookup-table matmul."""
  y = lut_lib.lut_matmul(jnp.asarray(x, dtype), box.array)
  if bias is not None:
    y = y + jnp.asarray(bias, dtype)
  return y


def _lut_reason(box, custom: str | None, dtype=None) -> str | None:
  if not isinstance(box, PackedParam):
    return "its kernel is not packed"
  if custom:
    return custom
  if dtype is not None and dtype not in (jnp.bfloat16, jnp.float32):
    return f"it computes in {dtype}; the kernel takes bfloat16 or float32"
  return lut_lib.lut_unsupported(box.array)


def _warn_fallback(name: str, reason: str) -> None:
  warnings.warn(f"gkq_jax: {name} cannot run through the lookup-table kernel ({reason}); "
                "it runs from its dense weight on the XLA path.", stacklevel=4)


def _linen_lut(module: nn.Module, args, kwargs):
  """Output of an nn.Dense call through the kernel, or None to run it as usual."""
  if type(module) is not nn.Dense or len(args) != 1 or kwargs:
    return None
  box = module.get_variable("params", "kernel")
  custom = None
  if module.dot_general is not None or module.dot_general_cls is not None:
    custom = "it sets its own dot_general"
  elif module.promote_dtype is not nn.dtypes.promote_dtype:
    custom = "it sets its own promote_dtype"
  bias = module.get_variable("params", "bias") if module.use_bias else None
  if isinstance(bias, PackedParam):
    bias = bias.dequantize()
  return _lut_or_fallback(args[0], box, bias, custom, module.dtype)


def _lut_or_fallback(x, box, bias, custom, module_dtype):
  """The LUT kernel's output, or None (and a warning naming a packed weight)
  where the layer must take the XLA path."""
  dtype = _compute_dtype(x, box, bias, module_dtype) if isinstance(box, PackedParam) else None
  reason = _lut_reason(box, custom, dtype)
  if reason:
    if isinstance(box, PackedParam):
      _warn_fallback(box.name, reason)
    return None
  return _lut_dense(x, box, bias, dtype)


def _nnx_lut(module: nnx.Module, args, kwargs):
  if not isinstance(module, nnx.Linear) or len(args) != 1 or kwargs:
    return None
  box = module.kernel.get_raw_value()
  custom = None
  if module.dot_general is not lax.dot_general:
    custom = "it sets its own dot_general"
  elif module.preferred_element_type is not None:
    custom = "it sets preferred_element_type"
  bias = module.bias[...] if module.bias is not None else None
  return _lut_or_fallback(args[0], box, bias, custom, module.dtype)


# ------------------------------------------------------------------ linen

def apply_packed(model: nn.Module, variables: Any, *args, kernel: str = "auto",
                 dense: Sequence[str] = (), **kwargs) -> Any:
  """``model.apply(variables, *args, **kwargs)`` where ``variables`` holds PackedArray leaves.

  Args:
    model: the user's linen module, unchanged.
    variables: e.g. ``{"params": gkq.pack_tree(q), "batch_stats": ...}``.
    kernel: "xla" dequantizes each weight where its layer reads it (fused by
      XLA); "lut" runs nn.Dense layers through the Pallas lookup-table kernel
      (interpret mode off GPU: for tests) and the rest as "xla"; "auto" is
      "lut" on a GPU and "xla" elsewhere.
    dense: regexes of leaf paths (``params/Dense_0/kernel``) to run from their
      dense weight, dequantized before the model runs.
    **kwargs: passed to ``model.apply`` (``method``, ``mutable``, ``rngs``, ...).

  Jit it as any apply: ``jax.jit(lambda v, x: gkq.apply_packed(model, v, x))``.
  """
  route = _check_kernel(kernel)

  def interceptor(next_fun, call_args, call_kwargs, context):
    with _layer_input(call_args):
      if route == "lut" and context.method_name == "__call__":
        y = _linen_lut(context.module, call_args, call_kwargs)
        if y is not None:
          return y
      return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(interceptor):
    return model.apply(_box(variables, dense), *args, **kwargs)


# -------------------------------------------------------------------- nnx

_WRAPPED: dict[type, type] = {}


def _intercepting(cls: type, route: str) -> type:
  """A subclass of ``cls`` whose __call__ notes its input (and may take the LUT route)."""
  key = (cls, route)
  if key not in _WRAPPED:
    def __call__(self, *args, **kwargs):
      with _layer_input(args):
        if route == "lut":
          y = _nnx_lut(self, args, kwargs)
          if y is not None:
            return y
        return cls.__call__(self, *args, **kwargs)

    _WRAPPED[key] = type(cls.__name__, (cls,), {
        "__call__": __call__, "__module__": cls.__module__, "_gkq_unwrapped": cls})
  return _WRAPPED[key]


def _owns_packed(module: nnx.Module) -> bool:
  return any(isinstance(v, nnx.Variable) and isinstance(v.get_raw_value(), PackedParam)
             for v in vars(module).values())


def _expected_kernel_shape(module: nnx.Module):
  """The kernel shape a flax layer was built for (None for modules that do not say)."""
  if getattr(module, "kernel_shape", None) is not None:
    return tuple(module.kernel_shape)
  if hasattr(module, "in_features") and hasattr(module, "out_features"):
    axes = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,)  # noqa: E731
    batch = tuple(getattr(module, "batch_axis", {}).values())
    return batch + axes(module.in_features) + axes(module.out_features)
  return None


def _check_kernel_shape(path, module: nnx.Module) -> None:
  """nnx.merge does not compare shapes; a packed kernel from another model must not run."""
  kernel = getattr(module, "kernel", None)
  if not isinstance(kernel, nnx.Variable) or not isinstance(kernel.get_raw_value(), PackedParam):
    return
  box = kernel.get_raw_value()
  expected, got = _expected_kernel_shape(module), box.shape
  if expected is not None and tuple(got)[box.array.stacked:] != expected:  # a stack: per layer
    name = "/".join(str(p) for p in path) or type(module).__name__
    raise ValueError(f"{name}/kernel: the packed weight has shape {tuple(got)}, the "
                     f"{type(module).__name__} expects {expected}; is this packed state from "
                     "another model?")


def merge_packed(graphdef, state: Any, *states: Any, kernel: str = "auto",
                 dense: Sequence[str] = ()) -> nnx.Module:
  """``nnx.merge(graphdef, state, *states)`` for a state with PackedArray leaves.

  The returned module runs from the packed weights (see :func:`apply_packed`
  for ``kernel`` and ``dense``; paths are the state's, e.g. ``hidden/kernel``).
  Call it, or pass it to ``nnx.jit``, as the original model.
  """
  route = _check_kernel(kernel)
  model = nnx.merge(graphdef, *(_box(s, dense) for s in (state,) + states))
  for path, module in nnx.iter_modules(model):
    _check_kernel_shape(path, module)
    if _owns_packed(module) and not hasattr(type(module), "_gkq_unwrapped"):
      object.__setattr__(module, "__class__", _intercepting(type(module), route))
  return model
