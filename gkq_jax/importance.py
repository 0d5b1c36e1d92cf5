"""Per-weight importance from the loss gradient.

``abs_grad``: mean over batches of |dL/dw| (the seed's first-order criterion).
``grad_sq``: mean over batches of (dL/dw)^2, the diagonal of the empirical
Fisher as used by "Towards the Limit of Network Quantization" and SqueezeLLM
(per-batch gradients; use small batches for a closer per-example estimate).
``none``: all ones, i.e. plain k-means.

Only floating-point leaves are differentiated; the others (an nnx state's RNG
keys and counts, integer buffers) get ``None`` as their importance, which
:func:`gkq_jax.quantize` accepts, so the whole ``nnx.split(model)`` state can be
passed as it is. ``None`` means "no importance": such a leaf, if a rule
clusters it, is clustered unweighted (and :func:`gkq_jax.quantize` warns when
its siblings are weighted).

nnx models: pass the module itself and a loss of the module,
``compute_importance(lambda model, batch: loss(model(batch[0]), batch[1]), model,
batches)``. The split, the merge (a fresh copy per traced call, so a
``__call__`` that updates BatchNorm statistics in train mode or a step counter
works) and the choice of what to differentiate (the ``nnx.Param`` s) are done
here; the model itself is left as it was.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

IMPORTANCE_KINDS = ("abs_grad", "grad_sq", "none")


def _is_float(leaf) -> bool:
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    dtype = jnp.result_type(leaf)
  return jax.dtypes.issubdtype(dtype, jnp.floating)


def _merge(floating, float_leaves, other_leaves):
  """The full leaf list from the float leaves and the others, in tree order."""
  floats, others = iter(float_leaves), iter(other_leaves)
  return [next(floats) if f else next(others) for f in floating]


@functools.partial(jax.jit, static_argnames=("loss_fn", "kind", "treedef", "floating"))
def _accumulate(total, float_leaves, other_leaves, batch, *, loss_fn, kind, treedef, floating):
  def loss(float_leaves):
    params = jax.tree_util.tree_unflatten(treedef, _merge(floating, float_leaves,
                                                          other_leaves))
    return loss_fn(params, batch)

  grads = jax.grad(loss)(float_leaves)
  fn = jnp.abs if kind == "abs_grad" else jnp.square
  return [t + fn(g).astype(t.dtype) for t, g in zip(total, grads)]


def compute_importance(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                       batches: Iterable[Any], kind: str = "grad_sq") -> Any:
  """A pytree shaped like ``params`` holding each weight's importance.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``; any pytree of params. With
      an nnx module as ``params``: ``loss_fn(model, batch) -> scalar``.
    params: the parameters to differentiate: any pytree, e.g. linen params or
      a whole nnx state (``nnx.split(model)[1]``); or an ``nnx.Module``, whose
      ``nnx.Param`` s are differentiated through a fresh copy of the module
      per traced call (state its ``__call__`` mutates, such as BatchNorm
      statistics in train mode or a step counter, is updated on the copy and
      dropped: the module is left as it was).
    batches: an iterable of batches (consumed once).
    kind: "abs_grad", "grad_sq" or "none".

  Returns:
    float32 importance for every floating-point leaf, ``None`` for the others
    ("no importance": clustered unweighted if a rule selects it). For a
    module: an ``nnx.State`` shaped like ``nnx.state(model)`` with the
    importance of every floating-point Param and ``None`` elsewhere (batch
    statistics, RNG state, counters), to pass with ``nnx.state(model)`` to
    :func:`gkq_jax.quantize` (``nnx.filter_state(importance, nnx.Param)``
    goes with ``nnx.state(model, nnx.Param)``).
  """
  if kind not in IMPORTANCE_KINDS:
    raise ValueError(f"kind={kind!r} is not one of {IMPORTANCE_KINDS}.")
  if isinstance(params, nnx.Module):
    graphdef, state = nnx.split(params)
    # copy=True: the module's Variables are made afresh inside each trace, where __call__
    # may update them; merging the caller's Variables there raises flax's TraceContextError.
    module_loss = lambda s, batch: loss_fn(nnx.merge(graphdef, s, copy=True), batch)
    return _importance(module_loss, state, batches, kind, _param_leaves(state))
  return _importance(loss_fn, params, batches, kind, None)


def _param_leaves(state) -> tuple[bool, ...]:
  """Per leaf of an nnx state: whether it belongs to an ``nnx.Param``."""
  is_variable = lambda x: isinstance(x, nnx.Variable)
  return tuple(isinstance(node, nnx.Param)
               for node in jax.tree_util.tree_leaves(state, is_leaf=is_variable)
               for _ in jax.tree_util.tree_leaves(node))


def _importance(loss_fn, params, batches, kind, wrt: tuple[bool, ...] | None) -> Any:
  """:func:`compute_importance` of the floating-point leaves (among ``wrt``'s, if given)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  wrt = (True,) * len(leaves) if wrt is None else wrt
  floating = tuple(_is_float(leaf) and w for leaf, w in zip(leaves, wrt))
  if not any(floating):
    raise ValueError("params has no floating-point leaf to differentiate; pass the model's "
                     "parameters (e.g. nnx.split(model)[1], linen's variables or an nnx "
                     "module with nnx.Param s).")
  float_leaves = [leaf for leaf, f in zip(leaves, floating) if f]
  other_leaves = [leaf for leaf, f in zip(leaves, floating) if not f]

  def as_tree(float_results):
    return jax.tree_util.tree_unflatten(
        treedef, _merge(floating, float_results, [None] * len(other_leaves)))

  if kind == "none":
    return as_tree([jnp.ones(jnp.shape(leaf), jnp.float32) for leaf in float_leaves])
  total = [jnp.zeros(jnp.shape(leaf), jnp.float32) for leaf in float_leaves]
  count = 0
  for batch in batches:
    total = _accumulate(total, float_leaves, other_leaves, batch, loss_fn=loss_fn, kind=kind,
                        treedef=treedef, floating=floating)
    count += 1
  if count == 0:
    raise ValueError("batches is empty: importance needs at least one batch.")
  return as_tree([t / count for t in total])


def damp_importance(importance: Any, damping: float) -> Any:
  """``h + damping x mean(h)``, leaf by leaf (None leaves stay None).

  The Fisher diagonal from a few thousand examples is noisy, and summed over
  many weights it leaves out the cross terms: weights whose estimate is near
  zero are not free to move all at once. Damping keeps a floor under every
  weight, as Levenberg-Marquardt and OBS damp a Hessian. ``damping=0`` is the
  raw estimate; a large damping tends to unweighted clustering scaled, layer by
  layer, by the layer's mean importance (which still ranks the layers).
  """
  if not 0 <= damping < float("inf"):
    raise ValueError(f"damping must be a finite number >= 0, got {damping}.")
  return jax.tree.map(lambda h: h + damping * jnp.mean(h), importance)
