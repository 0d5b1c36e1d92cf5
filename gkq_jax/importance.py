"""Per-weight importance from the loss gradient.

``abs_grad``: mean over batches of |dL/dw| (the seed's first-order criterion).
``grad_sq``: mean over batches of (dL/dw)^2, the diagonal of the empirical
Fisher as used by "Towards the Limit of Network Quantization" and SqueezeLLM
(per-batch gradients; use small batches for a closer per-example estimate).
``none``: all ones, i.e. plain k-means.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

IMPORTANCE_KINDS = ("abs_grad", "grad_sq", "none")


@functools.partial(jax.jit, static_argnames=("loss_fn", "kind"))
def _accumulate(total, params, batch, *, loss_fn, kind):
  grads = jax.grad(loss_fn)(params, batch)
  fn = jnp.abs if kind == "abs_grad" else jnp.square
  return jax.tree.map(lambda t, g: t + fn(g).astype(t.dtype), total, grads)


def compute_importance(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                       batches: Iterable[Any], kind: str = "grad_sq") -> Any:
  """A pytree shaped like ``params`` holding each weight's importance.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``; any pytree of params.
    params: the parameters to differentiate.
    batches: an iterable of batches (consumed once).
    kind: "abs_grad", "grad_sq" or "none".
  """
  if kind not in IMPORTANCE_KINDS:
    raise ValueError(f"kind={kind!r} is not one of {IMPORTANCE_KINDS}.")
  if kind == "none":
    return jax.tree.map(jnp.ones_like, params)
  total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  count = 0
  for batch in batches:
    total = _accumulate(total, params, batch, loss_fn=loss_fn, kind=kind)
    count += 1
  if count == 0:
    raise ValueError("batches is empty: importance needs at least one batch.")
  return jax.tree.map(lambda t: t / count, total)
