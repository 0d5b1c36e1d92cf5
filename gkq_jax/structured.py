"""Structured pruning that shrinks arrays: whole neurons, filters and channels.

A :class:`ChannelGroup` names the layers that share one set of channels: the
``producers`` whose outputs they are (a conv's filters, a Dense layer's
neurons; several producers when residual connections add their outputs), the
BatchNorm ``norms`` applied to them, and the ``consumers`` that read them (the
next conv or Dense layer; a Dense layer after a flatten reads ``S * C``
inputs, channel-minor, as flax's channels-last reshape lays them out).
:func:`keep_channels` cuts every array of the group down to the kept
channels, so the result is the params of a narrower model, not a mask.

Which channels to keep:
  * :func:`filter_norms` with ``ord=1``: Li et al.'s L1 norm of each filter;
    ``ord=2``: the L2 norm of each neuron's incoming weights.
  * :func:`merge_similar_neurons`: Srinivas & Babu's data-free criterion: the
    neuron j whose incoming weights are closest to another neuron i's
    (saliency <a_j^2> ||w_i - w_j||^2, a_j its outgoing weights) is removed and
    its outgoing weights are added to i's, one pair at a time.

Paths are '/'-joined layer names in the params tree (``"Conv_0"``,
``"BasicBlock_3/Conv_0"``). Functions take the model's variables, a dict with
``"params"`` and optionally ``"batch_stats"``, and return new variables.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
  """Layers sharing one set of channels (see the module docstring)."""

  producers: tuple[str, ...]
  consumers: tuple[str, ...] = ()
  norms: tuple[str, ...] = ()

  def __post_init__(self):
    for field in ("producers", "consumers", "norms"):
      value = getattr(self, field)
      if isinstance(value, str):
        object.__setattr__(self, field, (value,))
    if not self.producers:
      raise ValueError("a ChannelGroup needs at least one producer layer.")


def _layer(tree: Any, path: str, what: str) -> dict:
  node = tree
  for key in path.split("/"):
    if not isinstance(node, dict) or key not in node:
      raise ValueError(f"{what} layer {path!r} is not in the variables; "
                       f"top-level names: {sorted(tree) if isinstance(tree, dict) else tree}.")
    node = node[key]
  return node


def _with_layer(tree: dict, path: str, layer: dict) -> dict:
  """A copy of ``tree`` with the layer at ``path`` replaced (copies along the path only)."""
  head, _, rest = path.partition("/")
  out = dict(tree)
  out[head] = _with_layer(tree[head], rest, layer) if rest else layer
  return out


def num_channels(variables: dict, group: ChannelGroup) -> int:
  """The group's channel count, checked to agree across its layers."""
  counts = {p: _layer(variables["params"], p, "producer")["kernel"].shape[-1]
            for p in group.producers}
  if len(set(counts.values())) != 1:
    raise ValueError(f"the producers of a ChannelGroup must have as many output channels; "
                     f"got {counts}.")
  return next(iter(counts.values()))


def filter_norms(variables: dict, group: ChannelGroup, ord: int = 1) -> jax.Array:
  """Per channel, the ``ord``-norm of its weights in each producer's kernel, summed
  over producers (Li et al. use ord=1 on conv filters)."""
  if ord not in (1, 2):
    raise ValueError(f"ord must be 1 (L1, Li et al.) or 2 (L2), got {ord}.")
  num_channels(variables, group)
  total = 0.0
  for path in group.producers:
    kernel = jnp.asarray(_layer(variables["params"], path, "producer")["kernel"])
    flat = kernel.reshape(-1, kernel.shape[-1])
    total = total + (jnp.sum(jnp.abs(flat), 0) if ord == 1 else jnp.sqrt(jnp.sum(flat ** 2, 0)))
  return total


def keep_largest(scores, num_keep: int) -> np.ndarray:
  """Sorted indices of the ``num_keep`` highest scores (ties: lower index first)."""
  scores = np.asarray(scores)
  if not 1 <= num_keep <= scores.size:
    raise ValueError(f"cannot keep {num_keep} of {scores.size} channels: keep between 1 and "
                     f"{scores.size}, i.e. remove at most {scores.size - 1} of the layer's "
                     f"{scores.size}.")
  order = np.argsort(-scores, kind="stable")
  return np.sort(order[:num_keep])


def _take(array, keep, axis):
  return jnp.take(jnp.asarray(array), jnp.asarray(keep), axis=axis)


def _consumer_kernel(kernel, keep, channels: int, path: str):
  kernel = jnp.asarray(kernel)
  inputs = kernel.shape[-2]
  if inputs == channels:
    return _take(kernel, keep, kernel.ndim - 2)
  if kernel.ndim == 2 and inputs % channels == 0:
    # A Dense layer after a channels-last flatten: rows are (position, channel).
    grid = kernel.reshape(inputs // channels, channels, kernel.shape[-1])
    return _take(grid, keep, 1).reshape(-1, kernel.shape[-1])
  raise ValueError(f"consumer {path!r} reads {inputs} inputs, which is neither the group's "
                   f"{channels} channels nor a flatten of them.")


def keep_channels(variables: dict, group: ChannelGroup, keep) -> dict:
  """``variables`` with only channels ``keep`` (sorted indices) of the group."""
  channels = num_channels(variables, group)
  keep = np.asarray(keep)
  if keep.ndim != 1 or keep.size < 1 or keep.min() < 0 or keep.max() >= channels:
    raise ValueError(f"keep must list between 1 and {channels} channel indices in "
                     f"0..{channels - 1}; got {keep.tolist()}.")
  params = variables["params"]
  for path in group.producers:
    layer = dict(_layer(params, path, "producer"))
    layer["kernel"] = _take(layer["kernel"], keep, -1)
    if "bias" in layer:
      layer["bias"] = _take(layer["bias"], keep, 0)
    params = _with_layer(params, path, layer)
  for path in group.consumers:
    layer = dict(_layer(params, path, "consumer"))
    layer["kernel"] = _consumer_kernel(layer["kernel"], keep, channels, path)
    params = _with_layer(params, path, layer)
  out = dict(variables, params=params)
  stats = variables.get("batch_stats")
  for path in group.norms:
    norm = {k: _take(v, keep, 0) for k, v in _layer(params, path, "norm").items()}
    out["params"] = params = _with_layer(params, path, norm)
    if stats is not None and _has(stats, path):
      stats = _with_layer(stats, path, {k: _take(v, keep, 0)
                                        for k, v in _layer(stats, path, "norm").items()})
  if stats is not None:
    out["batch_stats"] = stats
  return out


def _has(tree, path: str) -> bool:
  try:
    _layer(tree, path, "")
    return True
  except ValueError:
    return False


def merge_similar_neurons(variables: dict, group: ChannelGroup,
                          num_keep: int) -> tuple[np.ndarray, dict]:
  """Srinivas & Babu's data-free pruning of Dense neurons.

  Repeatedly removes the neuron j (and keeps i) of the pair with the lowest
  saliency <a_j^2> ||w_i - w_j||^2, where w are incoming weights with the bias
  and a_j the neuron's outgoing weights in every consumer, and adds a_j to
  a_i. With ReLU, two neurons with equal incoming weights give equal outputs,
  so merging them changes nothing. Returns (kept indices, variables).
  """
  if len(group.producers) != 1 or not group.consumers or group.norms:
    raise ValueError("merge_similar_neurons needs one producer, at least one consumer and no "
                     "norm layers between them (BatchNorm breaks the equal-output argument).")
  params = variables["params"]
  layer = _layer(params, group.producers[0], "producer")
  channels = layer["kernel"].shape[-1]
  keep_largest(np.zeros(channels), num_keep)  # the same bounds check as norm pruning
  incoming = jnp.asarray(layer["kernel"]).reshape(-1, channels).T
  if "bias" in layer:
    incoming = jnp.concatenate([incoming, jnp.asarray(layer["bias"])[:, None]], 1)
  kernels = []
  for path in group.consumers:
    kernel = jnp.asarray(_layer(params, path, "consumer")["kernel"])
    if kernel.ndim != 2 or kernel.shape[0] != channels:
      raise ValueError(f"consumer {path!r} must be a Dense kernel with {channels} input rows; "
                       f"got shape {kernel.shape}.")
    kernels.append(kernel)
  outgoing = jnp.concatenate(kernels, 1)
  merged, alive = _merge(incoming, outgoing, channels - num_keep)
  keep = np.flatnonzero(np.asarray(alive))
  start = 0
  for path, kernel in zip(group.consumers, kernels):
    width = kernel.shape[1]
    layer = dict(_layer(params, path, "consumer"), kernel=merged[:, start:start + width])
    params = _with_layer(params, path, layer)
    start += width
  return keep, keep_channels(dict(variables, params=params), group, keep)


@functools.partial(jax.jit, static_argnums=2)
def _merge(incoming, outgoing, num_remove):
  n = incoming.shape[0]
  sq = jnp.sum(incoming ** 2, 1)
  dist = jnp.maximum(sq[:, None] + sq[None, :] - 2 * incoming @ incoming.T, 0.0)
  eye = jnp.eye(n, dtype=bool)

  def remove_one(_, carry):
    outgoing, alive = carry
    # saliency[i, j]: removing j and adding its outgoing weights to i.
    saliency = jnp.mean(outgoing ** 2, 1)[None, :] * dist
    valid = alive[:, None] & alive[None, :] & ~eye
    flat = jnp.argmin(jnp.where(valid, saliency, jnp.inf))
    i, j = flat // n, flat % n
    outgoing = outgoing.at[i].add(outgoing[j]).at[j].set(0.0)
    return outgoing, alive.at[j].set(False)

  return jax.lax.fori_loop(0, num_remove, remove_one, (outgoing, jnp.ones(n, bool)))


def remove_layers(variables: dict, paths: Sequence[str]) -> dict:
  """``variables`` without the sub-trees at ``paths`` (e.g. whole residual blocks
  whose identity shortcut carries the signal once they are gone)."""
  out = dict(variables)
  for collection, tree in variables.items():
    for path in paths:
      if collection == "params":
        _layer(tree, path, "removed")
      if _has(tree, path):
        tree = _without(tree, path)
    out[collection] = tree
  return out


def _without(tree: dict, path: str) -> dict:
  head, _, rest = path.partition("/")
  out = dict(tree)
  if rest:
    out[head] = _without(tree[head], rest)
  else:
    del out[head]
  return out
