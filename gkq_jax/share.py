"""Fine-tuning on shared centroids, as an optax transformation.

``share_centroids(q)`` moves every cluster of a clustered weight by the mean of
its members' updates (the projection onto the weight-shared subspace) or by
their sum (Deep Compression's centroid gradient, meant for plain SGD). Put it
last in a chain and pass the params to ``update`` (``optax.chain``, Flax's
``TrainState.apply_gradients`` and ``nnx.Optimizer`` all do)::

    tx = optax.chain(optax.sgd(lr, momentum=0.9), share_centroids(q))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

Sharing is exact by construction, not by floating-point luck: each cluster's
new value is computed once (its current value plus the reduced update, rounded
to the params' dtype) and every member's update is that value minus the
member's weight. ``p + (c - p)`` involves no multiplication (so no fused
multiply-add can round one member differently from another), and members
holding the same ``p`` get the same result whatever the compiler vectorises.
A member that left its cluster's value (a step taken without this
transformation) is pulled back onto it at the next step. The updates of the
older ``mean(u)[cluster]`` form relied on ``p + u`` rounding identically for
every member, which XLA's CPU code does not promise (issue 20: one ulp of drift
per step on AVX-512 machines).

Composes with ``optax.masked`` and :func:`gkq_jax.prune.keep_pruned`; a pruned
weight (the pinned zero centroid) never moves.

Dense-and-sparse leaves (a ClusteredArray with a ``sparse`` part): the weights
kept exactly are free weights. They take no part in any cluster's reduction
(each cluster moves by its clustered members' updates only) and each follows
its own update, as an unclustered weight would; :func:`refresh_codebooks`
reads their new values into the sparse part. :func:`codebook_params` /
:func:`replace_codebooks` train the codebooks only: the kept values stay as
they are there.

Leaves are matched by their key paths, not by tree structure, so the ``q`` of a
full ``nnx.split`` state, of ``nnx.state(model, nnx.Param)`` or of its
``nnx.to_pure_dict`` all serve ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` (which
passes a State of Params to ``init`` and pure arrays to ``update``).

To train the codebooks themselves instead (gradients with respect to the shared
values, no integer leaves in sight), use :func:`codebook_params` and
:func:`replace_codebooks`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gkq_jax import _vectors
from gkq_jax._clustering import is_traced
from gkq_jax._paths import path_keys, path_string
from gkq_jax.clustered import ClusteredArray, is_clustered

REDUCTIONS = ("mean", "sum")


def _table(leaf: ClusteredArray) -> tuple[jax.Array, int]:
  """(each weight's row in the leaf's table of clusters, as a (fan_in, C) array;
  the table's number of rows). The table has one column per channel (one
  column for vector codebooks), so per-cluster sums are scatters that follow a
  channel sharding of the weight. A leaf with a sparse part has one more row,
  the last, that holds its free weights (the kept ones): :func:`_free`."""
  if leaf.vector_shape is None:
    seg, rows = leaf.segments()
  else:
    k, d = leaf.codebook.shape
    seg = leaf.indices.astype(jnp.int32)[..., None] * d + jnp.arange(d, dtype=jnp.int32)
    seg = _vectors.from_vectors(seg, leaf.vector_axis, leaf.vector_shape)  # as dequantize
    seg, rows = seg.reshape(-1, 1), k * d
  if leaf.sparse is None:
    return seg, rows
  # seg is the weight read in C order (as dequantize lays it out), so a flat
  # position of the dense weight is a flat position of seg.
  seg = seg.reshape(-1).at[jnp.reshape(leaf.sparse.positions, -1)].set(
      rows, mode="drop").reshape(seg.shape)
  return seg, rows + 1


def _free(leaf: ClusteredArray, seg) -> jax.Array | None:
  """Where the leaf's weights are free (its sparse part), as ``seg``'s shape; None: nowhere."""
  if leaf.sparse is None:
    return None
  return leaf.sparse.mask(seg.shape)


def _cluster_rows(leaf: ClusteredArray, rows: int) -> int:
  """The table's rows that are clusters (all but a sparse part's row of free weights)."""
  return rows - 1 if leaf.sparse is not None else rows


def _table_of_codebook(leaf: ClusteredArray, book) -> jax.Array:
  """The codebook laid out as the leaf's (rows, columns) table."""
  if leaf.vector_shape is not None:
    return book.reshape(-1, 1)
  book = book if book.ndim == 3 else book[None]
  groups, channels, k = book.shape
  return book.transpose(0, 2, 1).reshape(groups * k, channels)


def _codebook_of_table(leaf: ClusteredArray, table) -> jax.Array:
  if leaf.vector_shape is not None:
    return table.reshape(leaf.codebook.shape)
  k = leaf.codebook.shape[-1]
  book = table.reshape(-1, k, table.shape[-1]).transpose(0, 2, 1)
  return book.reshape(leaf.codebook.shape)


def _scatter(seg, values, rows: int, op: str, fill=0.0):
  """``op`` ("add", "max", "min") of ``values`` (fan_in, C) into a (rows, C) table."""
  table = jnp.full((rows, seg.shape[1]), fill, values.dtype)
  columns = jnp.arange(seg.shape[1], dtype=jnp.int32)[None, :]
  return getattr(table.at[seg, columns], op)(values)


def _gather(table, seg):
  return table[seg, jnp.arange(seg.shape[1], dtype=jnp.int32)[None, :]]


def _pinned_rows(leaf: ClusteredArray, rows: int) -> jax.Array | None:
  """Rows of the table that are a pinned zero (index 0 of every codebook row)."""
  if not leaf.pinned_zero or leaf.vector_shape is not None:
    return None
  return (jnp.arange(rows) % leaf.codebook.shape[-1] == 0)[:, None]


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)  # a leaf left out by optax.masked


def _clusters_by_key(quantized: Any) -> dict[tuple, tuple[str, ClusteredArray]]:
  """{key path: (path string, ClusteredArray)} of every clustered leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(quantized, is_leaf=is_clustered)
  found = {path_keys(p): (path_string(p), leaf) for p, leaf in flat if is_clustered(leaf)}
  if not found:
    raise ValueError("quantized holds no ClusteredArray: pass the output of gkq_jax.quantize.")
  return found


def _leaves_by_key(tree: Any, is_leaf=None) -> dict[tuple, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {path_keys(p): leaf for p, leaf in flat}


def _check_covers(clusters: dict, leaves: dict, what: str, caller: str) -> None:
  """Every clustered leaf of q must be found, with its shape, in ``leaves``."""
  missing = [name for key, (name, _) in clusters.items() if key not in leaves]
  if missing:
    sample = ", ".join(repr("/".join(map(str, k))) for k in list(leaves)[:3])
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ValueError(
        f"{caller}: q clusters {missing[0]!r}{more} but the {what} have no leaf there "
        f"(their paths look like {sample or 'nothing'}). "
        "Quantize the tree the optimizer updates: with nnx.Optimizer(model, tx, "
        "wrt=nnx.Param), nnx.split(model)[1], nnx.state(model, nnx.Param) or its "
        "nnx.to_pure_dict; with linen, the params collection itself.")
  for key, (name, leaf) in clusters.items():
    value = leaves[key]
    if not _is_masked(value) and tuple(jnp.shape(value)) != tuple(leaf.shape):
      raise ValueError(f"{caller}: {what} at {name!r} have shape {tuple(jnp.shape(value))}, "
                       f"but q clustered weights of shape {tuple(leaf.shape)} there; pass the "
                       "params q was quantized from.")


class ShareCentroidsState(NamedTuple):
  # One entry per clustered leaf of q, in q's order.
  segments: tuple  # per weight: its cluster's row in the leaf's table, (fan_in, C) int32
  scale: tuple  # per cluster: 1/size ("mean") or 1 ("sum"); 0 for a pinned zero; (rows, C)
  # per weight: True where it is free (a sparse part's, kept exactly), or None
  free: tuple = ()


def share_centroids(quantized: Any, reduce: str = "mean") -> optax.GradientTransformation:
  """An optax transformation that keeps clustered weights on shared values.

  Args:
    quantized: the output of :func:`gkq_jax.quantize` (its ClusteredArray
      leaves give the clusters). The params being trained are its dequantized
      form; they are matched to ``quantized`` by path, so any of the nnx state
      forms works (see the module docstring) and leaves ``quantized`` does not
      cluster pass through. ``init`` raises if a clustered path is missing from
      the params or has another shape.
    reduce: "mean" (projection) or "sum" (Deep Compression).
  """
  if reduce not in REDUCTIONS:
    raise ValueError(f"reduce={reduce!r} is not one of {REDUCTIONS}.")
  clusters = _clusters_by_key(quantized)
  slots = {key: i for i, key in enumerate(clusters)}

  def leaf_state(leaf):
    seg, rows = _table(leaf)
    counts = _scatter(seg, jnp.ones(seg.shape, jnp.float32), rows, "add")
    scale = 1.0 / jnp.maximum(counts, 1.0) if reduce == "mean" else jnp.ones_like(counts)
    pinned = _pinned_rows(leaf, rows)
    if pinned is not None:
      scale = jnp.where(pinned, 0.0, scale)
    if leaf.sparse is not None:  # the free weights' row: never read
      scale = scale.at[-1].set(0.0)
    return seg, scale, _free(leaf, seg)

  triples = [leaf_state(leaf) for _, leaf in clusters.values()]
  state = ShareCentroidsState(*(tuple(t[n] for t in triples) for n in range(3)))

  def init_fn(params):
    _check_covers(clusters, _leaves_by_key(params, is_leaf=_is_masked), "params",
                  "share_centroids")
    return state

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          "share_centroids needs the params in update: call tx.update(grads, opt_state, "
          "params) (optax.chain, TrainState.apply_gradients and nnx.Optimizer do). Each "
          "cluster's new shared value is computed from the params, so that every member "
          "lands on it exactly.")
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_masked)
    _check_covers(clusters, {path_keys(p): u for p, u in flat}, "updates", "share_centroids")
    param_by_key = _leaves_by_key(params, is_leaf=_is_masked)
    out = []
    for path, u in flat:
      key = path_keys(path)
      slot = slots.get(key)
      if slot is None or _is_masked(u):
        out.append(u)
        continue
      free = state.free[slot] if state.free else None
      out.append(_shared_update(u, param_by_key[key], state.segments[slot],
                                state.scale[slot], free))
    return treedef.unflatten(out), state

  return optax.GradientTransformation(init_fn, update_fn)


def _shared_update(u: jax.Array, p: jax.Array, seg: jax.Array, scale: jax.Array,
                   free: jax.Array | None = None) -> jax.Array:
  """The update that puts every member of a cluster on the cluster's new value.

  The new values are computed once per cluster (the members' current value,
  read as their maximum, + the reduced update, rounded to the params' dtype);
  the barrier keeps XLA from recomputing them per member, where a fused
  multiply-add could round one member apart. Free weights (``free``, a sparse
  part's) keep their own update ``u``.
  """
  p = jnp.asarray(p)
  rows = scale.shape[0]
  weights = p.reshape(seg.shape)
  total = _scatter(seg, u.reshape(seg.shape).astype(jnp.float32), rows, "add")
  current = _scatter(seg, weights.astype(jnp.float32), rows, "max", -jnp.inf)
  current = jnp.where(jnp.isfinite(current), current, 0.0)  # empty clusters: never read
  moved = jax.lax.optimization_barrier((current + total * scale).astype(p.dtype))
  work = jnp.promote_types(jnp.promote_types(p.dtype, u.dtype), jnp.float32)
  step = _gather(moved, seg).astype(work) - weights.astype(work)
  step = step.reshape(u.shape).astype(u.dtype)
  if free is not None:
    step = jnp.where(free.reshape(u.shape), u, step)
  return step


def refresh_codebooks(quantized: Any, params: Any) -> Any:
  """``quantized`` with codebooks read back from the fine-tuned dense ``params``
  and its other leaves (biases, norms) taken from ``params`` where it has them.

  ``params`` is matched to ``quantized`` by path (as in :func:`share_centroids`).
  After fine-tuning with :func:`share_centroids` every member of a cluster holds
  the same value and it is read back exactly. Where members differ (weights
  trained without the projection), the entry becomes the members' mean, the
  closest single value in the L2 sense; a pinned zero stays zero, even where
  its members all moved together. A leaf's sparse part (weights kept
  exactly) takes their values from ``params``; they take no part in any
  codebook entry. Whenever the result does not dequantize to
  ``params`` (weights that left their shared values, averaged or set back to
  zero) a warning names the leaf, how many weights and clusters, and how far
  the weights were from the values they now decode to (under ``jax.jit`` too,
  through ``jax.debug.callback``).
  """
  clusters = _clusters_by_key(quantized)
  dense_by_key = _leaves_by_key(params)
  _check_covers(clusters, dense_by_key, "params", "refresh_codebooks")

  def refresh(path, leaf):
    key = path_keys(path)
    if not is_clustered(leaf):
      return dense_by_key.get(key, leaf)
    seg, rows = _table(leaf)
    x = jnp.asarray(dense_by_key[key], jnp.float32).reshape(seg.shape)
    counts = _scatter(seg, jnp.ones(seg.shape, jnp.float32), rows, "add")
    hi = _scatter(seg, x, rows, "max", -jnp.inf)
    lo = _scatter(seg, x, rows, "min", jnp.inf)
    mean = _scatter(seg, x, rows, "add") / jnp.maximum(counts, 1.0)
    values = jnp.where(hi == lo, hi, mean)
    pinned = _pinned_rows(leaf, rows)
    if pinned is not None:
      values = jnp.where(pinned, 0.0, values)
    old = _table_of_codebook(leaf, leaf.codebook)
    clusters = _cluster_rows(leaf, rows)  # a sparse part's row of free weights left out
    book = _codebook_of_table(leaf, jnp.where(counts[:clusters] > 0, values[:clusters], old))
    out = leaf.replace(codebook=book.astype(leaf.codebook.dtype))
    if leaf.sparse is not None:
      out = out.replace(sparse=leaf.sparse.take(dense_by_key[key]))
    # The drift check compares what the result decodes to with the params themselves,
    # so it also sees members that moved together off a pinned zero.
    off = jnp.abs(out.dequantize().astype(jnp.float32).reshape(seg.shape) - x)
    moved = off > 0
    report = (jnp.sum(moved), jnp.sum(_scatter(seg, moved.astype(jnp.int32), rows, "max", 0)),
              jnp.max(off), jnp.max(jnp.abs(x)))
    if is_traced(*report):
      jax.debug.callback(functools.partial(_warn_drift, path_string(path)), *report)
    else:
      _warn_drift(path_string(path), *report, stacklevel=4)
    return out

  return jax.tree_util.tree_map_with_path(refresh, quantized, is_leaf=is_clustered)


def _warn_drift(name, weights, clusters, worst, largest, stacklevel=2) -> None:
  """refresh_codebooks' warning when its result does not decode to the params."""
  if int(weights) == 0:
    return
  share = f", {float(worst) / float(largest):.2%} of the largest |weight|" if largest else ""
  warnings.warn(
      f"refresh_codebooks: {int(weights)} weight(s) in {int(clusters)} cluster(s) of {name!r} "
      f"were off their shared values, by up to {float(worst):.4g}{share}; they now decode to "
      "their cluster's mean (or the pinned zero), so dequantize(result) differs from params "
      "there: fine-tune with share_centroids (and keep_pruned) to keep every weight on its "
      "shared value.", stacklevel=stacklevel)


def codebook_params(quantized: Any) -> Any:
  """The trainable part of a quantized tree: each ClusteredArray replaced by
  its float codebook, every other leaf as it is.

  ``jax.grad`` over a quantized tree itself fails on the integer indices; over
  this tree it gives the gradient with respect to every shared value (the sum
  of its members' gradients), ready for any optax optimizer::

    trainable = codebook_params(q)
    loss = lambda t, batch: loss_fn(dequantize(replace_codebooks(q, t)), batch)
    grads = jax.grad(loss)(trainable, batch)
  """
  return jax.tree.map(lambda x: x.codebook if is_clustered(x) else x, quantized,
                      is_leaf=is_clustered)


def replace_codebooks(quantized: Any, trainable: Any) -> Any:
  """``quantized`` with codebooks (and plain leaves) from ``trainable``, a tree
  shaped like :func:`codebook_params`'s output. A pinned zero is forced back
  to zero, so its gradient is zero and pruned weights stay pruned."""

  def put(leaf, value):
    if not is_clustered(leaf):
      return value
    if jnp.shape(value) != leaf.codebook.shape:
      raise ValueError(f"replace_codebooks: a codebook of shape {jnp.shape(value)} for a "
                       f"ClusteredArray whose codebook is {leaf.codebook.shape}.")
    if leaf.pinned_zero and leaf.vector_shape is None:
      value = value.at[..., 0].set(0.0)
    return leaf.replace(codebook=value)

  return jax.tree.map(put, quantized, trainable, is_leaf=is_clustered)
