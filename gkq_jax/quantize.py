"""Weight sharing over a whole parameter pytree (flax.linen params, nnx state, ...).

``quantize`` clusters the leaves chosen by the rules and returns the same
pytree in which each such leaf is a :class:`ClusteredArray` (codebook + integer
indices); every other leaf is untouched. ``dequantize`` gives the params back.
All scalar groups of a model go through one compiled call.

Granularities:
  * ``"layer"``: one codebook per parameter (Deep Compression).
  * ``"channel"``: one codebook per output channel, as SqueezeLLM and tfmot's
    per-channel clustering. The output channels are the layer's output
    features: the last axis, or the trailing ``channels`` axes that
    :mod:`gkq_jax.axes` says (all of a DenseGeneral's ``features``). With
    ``group_size`` (per grouped channel, as coremltools' per_grouped_channel):
    the leaf is read as a (fan_in, C) matrix (the other axes are the input
    rows) and each codebook serves ``group_size`` consecutive input rows of one
    output channel.

Stacked layers (``nn.scan`` kernels, :mod:`gkq_jax.axes`): with "layer" and
"channel", each layer's slice is clustered on its own, as the unscanned layer
would be; the other granularities refuse stacked leaves.
  * ``"model"``: one codebook shared by every selected parameter (Choi et al.);
    it has the largest number of clusters among the matching rules.
  * ``"combined"``: a global budget of centroids (default: the sum of the
    rules' numbers) split across layers in proportion to their sizes.
  * ``"vector"``: Deep k-Means style; the spatial filters of a conv kernel
    (HWIO -> vectors of H*W) are clustered as vectors with per-coordinate
    importance.
  * ``"row"``: Deep k-Means' own sharing; the rows of a conv kernel (HWIO ->
    vectors of W, one per (h, in, out)) are clustered as vectors, one codebook
    per layer with its rule's K, per-coordinate importance.
  "vector" and "row" apply to conv kernels only (ndim >= 3): a Dense kernel is
  an error, so give them rules that match conv kernels.

Dense-and-sparse (SqueezeLLM): with ``sparse_fraction`` > 0 the highest-scoring
weights (by sensitivity ``h w^2`` or magnitude ``|w|``), that fraction of each
clustered leaf or of all of them together, are kept exactly in the leaf's
sparse part (:class:`gkq_jax.SparseOutliers`) and take no part in the
clustering: the codebooks are fitted to the other weights only (removed from
the values clustered, as pruned weights are, but with no pinned zero), so an
outlier no longer drags a centroid. Scalar granularities ("layer",
"channel" with or without ``group_size``, "model", "combined").
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from gkq_jax import _distinct, _split_groups, _vectors, allocation
from gkq_jax import rules as rules_lib
from gkq_jax import sharding as sharding_lib
from gkq_jax._clustering import (
  Clustering,
  check_finite,
  check_nonnegative,
  is_traced,
  warn_unweighted,
)
from gkq_jax._outliers import check_sparse, sparse_positions
from gkq_jax._paths import named_leaves
from gkq_jax.axes import LeafAxes, axes_for
from gkq_jax.clustered import ClusteredArray, SparseOutliers, index_dtype
from gkq_jax.kmeans1d import grouped_kmeans_1d
from gkq_jax.kmeans_vectors import kmeans_vectors

GRANULARITIES = ("layer", "channel", "model", "combined", "vector", "row")


def _combined_budget(sizes: Sequence[int], ks: Sequence[int], budget: int | None):
  total = budget if budget is not None else int(sum(ks))
  n = np.asarray(sizes, np.float64)
  k = np.maximum(2, np.round(total * n / n.sum())).astype(np.int64)
  return np.minimum(k, rules_lib.MAX_CLUSTERS).tolist()


def quantize(params: Any, importance: Any = None,
             rules: Sequence[rules_lib.ClusterRule] = rules_lib.DEFAULT_RULES, *,
             granularity: str = "layer", budget: int | None = None, key=None,
             masks: Any = None, budget_bytes: float | None = None,
             group_size: int | None = None, axes: Mapping[str, LeafAxes] | None = None,
             sparse_fraction: float = 0.0, sparse_by: str = "sensitivity",
             sparse_scope: str = "matrix", **cluster_options) -> Any:
  """Clusters the selected leaves of ``params``.

  Args:
    params: any pytree of arrays.
    importance: a pytree of the same structure (e.g. from
      :func:`gkq_jax.compute_importance`) or None for plain k-means. A
      ``None`` leaf means "no importance" (what ``compute_importance`` gives
      leaves that are never clustered, such as nnx RNG keys): a clustered
      leaf with ``None`` is clustered unweighted, and when other clustered
      leaves have importance a warning names it (almost always a mistake;
      pass ``jnp.ones_like(leaf)`` to mean unweighted on purpose). A warning,
      not an error, because unweighted clustering of one leaf is legitimate.
    rules: :class:`ClusterRule` s; the first whose pattern matches a leaf's
      path decides its number of clusters.
    granularity: see the module docstring.
    budget: total centroids for ``granularity="combined"``.
    budget_bytes: make the selected leaves take at most this many bytes in
      the file (codebooks + coded indices) with the least importance-weighted
      distortion: :func:`gkq_jax.quantize_to_budget` (per-layer settings by
      exact allocation; its options ``methods``, ``allocation``, ``clusters``,
      ``pin_zero`` ... pass through ``cluster_options``). The rules then only
      select leaves. granularity="layer" only.
    masks: optional pytree of bools like params (True = kept, e.g. from
      :func:`gkq_jax.prune.magnitude_masks`): pruned weights take no part in
      the clustering and map to a pinned exact-zero centroid (index 0), which
      counts as one of the leaf's clusters.
    key: PRNG key for random initialisations.
    group_size: with granularity="channel", one codebook per ``group_size``
      consecutive input rows of each output channel (the leaf read as a
      (fan_in, C) matrix; it must divide every selected leaf's fan_in, per
      layer of a stack).
    axes: {path: :class:`gkq_jax.LeafAxes`}, e.g. from
      :func:`gkq_jax.layer_axes`: which trailing axes are each layer's output
      channels and which leading axes stack layers (a rule's
      ``channel_axes`` / ``stacked_axes`` override it). Paths match the end of
      this tree's paths. Default: the last axis, no stack.
    sparse_fraction: in [0, 1): the share of the clustered weights kept
      exactly (dense-and-sparse; 0, the default: none). Each clustered leaf
      that keeps any then has a ``sparse`` part
      (:class:`gkq_jax.SparseOutliers`: sorted flat positions and the
      weights' values in the leaf's dtype), its indices there are 0, and its
      codebooks are fitted to the other weights only.
      Pruned weights (``masks``) are never kept. Needs concrete weights (not
      under ``jax.jit``), a scalar granularity, no ``budget_bytes`` and
      unsharded leaves.
    sparse_by: the score that picks them: "sensitivity", ``h * w**2`` with h
      the importance (SqueezeLLM's sensitivity-based outliers; with no
      importance, or a ``None`` leaf of it, h = 1, so it falls back to
      magnitude), or "magnitude", ``|w|``.
    sparse_scope: "matrix": ``round(sparse_fraction * size)`` weights of each
      clustered leaf (a stack of layers counts as one leaf); "global": that
      fraction of all clustered weights together, the top scores of all
      leaves (so a leaf with large scores keeps more).
    **cluster_options: passed to :func:`gkq_jax.grouped_kmeans_1d` (method,
      init, objective, max_iter, tol, bins, ...) or, for "vector", to
      :func:`gkq_jax.kmeans_vectors` (init, max_iter, tol).

  Returns:
    ``params`` with each selected leaf replaced by a :class:`ClusteredArray`
    that dequantizes to the leaf's own dtype. Non-floating-point leaves (an
    nnx state's RNG keys and counts, integer buffers) are never clustered. A
    codebook group with at most K distinct values gets exactly those values
    (lossless; -0.0 comes back as 0.0), with every granularity and method.
  """
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}.")
  _check_group_size(group_size, granularity)
  sparse_fraction = check_sparse(sparse_fraction, sparse_by, sparse_scope, granularity,
                                  budget_bytes)
  if budget_bytes is not None:
    if granularity != "layer":
      raise ValueError(f"budget_bytes allocates one codebook per layer; got "
                       f"granularity={granularity!r}, use 'layer'.")
    return allocation.quantize_to_budget(params, importance, rules, budget_bytes, masks=masks,
                                         key=key, **cluster_options).quantized
  named = named_leaves(params)
  treedef = jax.tree.structure(params)
  paths = [path for path, _ in named]
  leaves = [leaf for _, leaf in named]
  rules_lib.check_rules(params, rules)
  if importance is None:
    imps = [None] * len(leaves)
  else:
    imps = _importance_leaves(treedef, importance)
    for path, leaf, imp in zip(paths, leaves, imps):
      if imp is not None and jnp.shape(imp) != jnp.shape(leaf):
        raise ValueError(f"importance of {path} has shape {jnp.shape(imp)}, "
                         f"the parameter {jnp.shape(leaf)}.")
  layouts = [axes_for(p, jnp.shape(leaf), rules_lib.rule_for(rules, p), axes)
             for p, leaf in zip(paths, leaves)]
  ks = [_clusters(rules, p, leaf, lay) if _is_float(leaf) else 0
        for p, leaf, lay in zip(paths, leaves, layouts)]
  masks = [None] * len(leaves) if masks is None else jax.tree_util.tree_leaves(masks)
  if len(masks) != len(leaves):
    raise ValueError("masks must have the same tree structure as params.")
  chosen = [i for i, k in enumerate(ks) if k > 0]
  if not chosen:
    raise ValueError("no parameter is selected for clustering: check the rules' "
                     f"patterns and min_ndim against paths such as {paths[:4]} "
                     "(non-floating-point leaves are never clustered).")
  if importance is not None:
    warn_unweighted("quantize", [paths[i] for i in chosen], [imps[i] for i in chosen])
  for i in chosen:
    _check_leaf(paths[i], leaves[i], imps[i], granularity)
    _check_axes(paths[i], layouts[i], granularity)
    _check_group_divides(paths[i], jnp.shape(leaves[i]), group_size, layouts[i])
  key = jax.random.PRNGKey(0) if key is None else key
  out = list(leaves)
  split = _split_leaves(granularity, chosen, paths, leaves, masks, layouts)
  kept = {}
  if sparse_fraction > 0:
    if split:
      raise ValueError(f"{paths[split[0]]} is sharded over devices; dense-and-sparse "
                       "(sparse_fraction > 0) needs unsharded weights: pass it unsharded or "
                       "use sparse_fraction=0.")
    kept = sparse_positions([paths[i] for i in chosen], [leaves[i] for i in chosen],
                            [imps[i] for i in chosen], [masks[i] for i in chosen],
                            sparse_fraction, sparse_by, sparse_scope)
    kept = dict(zip(chosen, kept))
  for i in split:
    out[i] = _cluster_where_it_lies(paths[i], leaves[i], imps[i], ks[i], key, cluster_options,
                                    group_size, layouts[i], granularity)
  here = [i for i in chosen if i not in split]  # all in one compiled call
  if granularity in _vectors.VECTOR_LAYOUTS:
    for n, i in enumerate(here):
      out[i] = _cluster_vectors(paths[i], leaves[i], imps[i], ks[i],
                                jax.random.fold_in(key, n), cluster_options, granularity)
  elif here:
    for i, clustered in zip(here, _cluster_scalars(
        [leaves[i] for i in here], [imps[i] for i in here], [ks[i] for i in here],
        [masks[i] for i in here], [paths[i] for i in here], granularity, budget, key,
        cluster_options, group_size, [layouts[i] for i in here],
        [kept.get(i) for i in here])):
      out[i] = clustered
  for i in chosen:  # the codebook stays float32; dequantize gives the leaf's dtype back
    out[i] = out[i].replace(dtype=np.dtype(jnp.result_type(leaves[i])))
    if i in kept and kept[i].size:  # a leaf that keeps none has no sparse part
      pos = jnp.asarray(kept[i], jnp.int32)
      out[i] = out[i].replace(sparse=SparseOutliers(pos, jnp.reshape(leaves[i], -1)[pos]))
  return jax.tree_util.tree_unflatten(treedef, out)


def _clusters(rules, path, leaf, layout: LeafAxes) -> int:
  """The rule's K, with min_ndim counted per layer of a stack."""
  rule = rules_lib.rule_for(rules, path)
  if rule is None or jnp.ndim(leaf) - layout.stacked < rule.min_ndim:
    return 0
  return rule.num_clusters


def _check_axes(path, layout: LeafAxes, granularity) -> None:
  if layout.stacked and granularity not in ("layer", "channel"):
    raise ValueError(f"{path} stacks {layout.stacked} axis/axes of layers, which "
                     f"granularity={granularity!r} does not split; use 'layer' or 'channel', "
                     "or set stacked_axes=0 in its rule to cluster the stack as one array.")


def _is_float(leaf) -> bool:
  return jax.dtypes.issubdtype(jnp.result_type(leaf), jnp.floating)


def _importance_leaves(treedef, importance) -> list:
  """One importance per params leaf; ``None`` (uniform) where importance has None,
  as :func:`gkq_jax.compute_importance` gives for non-float leaves."""
  try:
    return treedef.flatten_up_to(importance)
  except (ValueError, TypeError) as e:
    num = jax.tree_util.tree_structure(importance).num_leaves
    raise ValueError("importance must have the same tree structure as params "
                     f"({treedef.num_leaves} leaves vs {num}): {str(e).splitlines()[0]}") from e


def _check_leaf(path, leaf, imp, granularity) -> None:
  """Input errors of one selected parameter, named by its path and position."""
  shape = jnp.shape(leaf)
  if int(np.prod(shape)) == 0:
    raise ValueError(f"{path} has no elements (shape {shape}); leave it out of the rules, "
                     "e.g. with a pattern that does not match it.")
  if granularity == "channel" and not shape:
    raise ValueError(f"{path} is 0-d, so it has no output channel for granularity='channel'; "
                     "set the rule's min_ndim=1 (or more) or use granularity='layer'.")
  check_finite(path, leaf)
  if imp is not None:
    check_finite(f"importance of {path}", imp)
    check_nonnegative(f"importance of {path}", imp)


def _check_group_size(group_size, granularity) -> None:
  if group_size is None:
    return
  if (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
      or group_size < 1):
    raise ValueError(f"group_size must be a positive int (input rows per codebook), got "
                     f"{group_size!r}.")
  if granularity != "channel":
    raise ValueError(f"group_size splits the input rows of each output channel; it needs "
                     f"granularity='channel', got {granularity!r}.")


def _matrix(shape, layout: LeafAxes, granularity) -> tuple[int, int, int]:
  """(layers, input rows per layer, channels) of a leaf read as a stack of matrices."""
  shape = tuple(int(s) for s in shape)
  layers = int(np.prod(shape[:layout.stacked]))
  channels = int(np.prod(shape[len(shape) - layout.channels:])) if granularity == "channel" else 1
  size = int(np.prod(shape))
  return layers, size // max(layers * channels, 1), channels


def _check_group_divides(path, shape, group_size, layout: LeafAxes) -> None:
  if group_size is None:
    return
  _, fan_in, channels = _matrix(shape, layout, "channel")
  if fan_in % group_size:
    raise ValueError(f"group_size={group_size} does not divide the {fan_in} input rows of "
                     f"{path} (shape {shape}, read as ({fan_in}, {channels})"
                     f"{' per layer' if layout.stacked else ''}); choose a divisor or leave "
                     "this leaf out of the rules.")


def _scalar_layout(shape, mask, granularity, group_size=None, layout=LeafAxes(), kept=None):
  """Positions (into the flat dense leaf) to cluster, grouped row after row,
  the size of each row (one row per codebook) and the codebook's shape
  prefix: (C,) or (R, C) for R = layers x row groups > 1. Pruned weights
  (``mask`` False) and those ``kept`` exactly (flat positions) are left out."""
  layers, fan_in, channels = _matrix(shape, layout, granularity)
  per_layer = fan_in // group_size if group_size is not None else 1
  size = int(np.prod(shape))
  # Codebook (l, r, c) serves input rows r * g .. (r + 1) * g - 1 of channel c in layer l.
  order = np.arange(size).reshape(layers, per_layer, fan_in // per_layer, channels)
  order = order.transpose(0, 1, 3, 2).reshape(layers * per_layer * channels, -1)
  book = (channels,) if layers * per_layer == 1 else (layers * per_layer, channels)
  if mask is None and kept is None:
    return order.reshape(-1), [order.shape[1]] * order.shape[0], book
  keep = np.ones(size, bool) if mask is None else np.array(mask, bool).reshape(-1)
  if kept is not None:
    keep[kept] = False
  keep = keep[order]
  return order[keep], keep.sum(axis=1).tolist(), book


def _cluster_scalars(leaves, imps, ks, masks, paths, granularity, budget, key, options,
                     group_size=None, leaf_axes=None, kept=None):
  # Converted to float32 after the gather below, not before: a bfloat16 leaf
  # then never has a whole float32 copy (a block of channels at a time does).
  arrays = [jnp.asarray(x) for x in leaves]
  pinned = [m is not None and not bool(np.all(np.asarray(m))) for m in masks]
  leaf_axes = leaf_axes or [LeafAxes()] * len(arrays)
  kept = kept or [None] * len(arrays)
  layouts = [_scalar_layout(a.shape, m if p else None, granularity, group_size, lay, s)
             for a, m, p, lay, s in zip(arrays, masks, pinned, leaf_axes, kept)]
  for path, (_, rows, _), s in zip(paths, layouts, kept):
    if min(rows) == 0:
      why = "pruned" if s is None else "pruned or kept exactly (sparse_fraction)"
      raise ValueError(f"{path}: every weight of a codebook group is {why}; prune less"
                       f"{'' if s is None else ' or keep fewer'} or use granularity='layer'.")
  # A pinned zero takes one of the k slots.
  own_k = [k - 1 if p else k for k, p in zip(ks, pinned)]
  if granularity == "combined":
    own_k = _combined_budget([a.size for a in arrays], own_k, budget)
  if min(own_k) < 1:
    raise ValueError("a pruned parameter needs at least 2 clusters (zero + one value).")
  x = jnp.concatenate([a.reshape(-1)[pos].astype(jnp.float32)
                       for a, (pos, _, _) in zip(arrays, layouts)])
  h = None
  if any(w is not None for w in imps):
    h = jnp.concatenate([jnp.ones(pos.size, jnp.float32) if w is None
                         else jnp.asarray(w, jnp.float32).reshape(-1)[pos]
                         for w, (pos, _, _) in zip(imps, layouts)])
  if granularity == "model":
    sizes, group_k = [x.shape[0]], [max(own_k)]
  else:
    sizes = [n for _, rows, _ in layouts for n in rows]
    group_k = [k for (_, rows, _), k in zip(layouts, own_k) for _ in rows]
  result = grouped_kmeans_1d(x, h, sizes, group_k, key=key, **options)
  centroids, assignments = result.centroids, result.assignments

  out, offset, group = [], 0, 0
  for a, (pos, rows, shape), k, pin, lay in zip(arrays, layouts, own_k, pinned, leaf_axes):
    if granularity == "model":
      book = jnp.repeat(centroids[0:1, :group_k[0]], len(rows), axis=0)
    else:
      book = centroids[group:group + len(rows), :k]
      group += len(rows)
    idx = assignments[offset:offset + pos.size] + (1 if pin else 0)
    offset += pos.size
    flat_idx = jnp.zeros(a.size, jnp.int32).at[pos].set(idx)
    if pin:
      book = jnp.concatenate([jnp.zeros((book.shape[0], 1), book.dtype), book], axis=1)
    book = book.reshape(shape + (book.shape[-1],))  # (C, k) or (R, C, k)
    out.append(ClusteredArray(book, flat_idx.reshape(a.shape).astype(index_dtype(book.shape[-1])),
                              pinned_zero=pin, stacked=lay.stacked))
  return out


def _split_leaves(granularity, chosen, paths, leaves, masks, layouts) -> list[int]:
  """The chosen leaves sharded over devices, clustered where they lie
  (:mod:`gkq_jax.sharding`): per channel shard by shard where the output
  channels are split, per layer by histograms summed over the devices."""
  found = []
  for i in chosen:
    sharding = sharding_lib.named_sharding(leaves[i])
    if sharding is None:
      continue
    if granularity not in ("channel", "layer"):
      raise ValueError(
          f"{paths[i]} is sharded over {sharding.mesh.size} devices "
          f"({sharding.spec}); granularity={granularity!r} would gather it onto one device. "
          "Use granularity='channel' (clustered shard by shard where the output channels "
          "are split) or 'layer' (histograms summed over devices), or pass it unsharded.")
    shape = jnp.shape(leaves[i])
    if granularity == "layer":
      sharding_lib.split_axes(paths[i], shape, sharding, layouts[i].stacked)
    elif sharding_lib.channel_split(paths[i], shape, sharding, layouts[i].stacked,
                                    layouts[i].channels) is None:
      raise ValueError(
          f"{paths[i]} is split over devices along axes other than its output channels "
          f"({sharding.spec}); per-channel clustering runs shard by shard only on weights split "
          "along their (first) output-channel axis: reshard it, e.g. to P(None, ..., 'model'), "
          "or use granularity='layer'.")
    if masks[i] is not None and not bool(np.all(np.asarray(masks[i]))):
      raise ValueError(f"{paths[i]}: pruning masks of sharded weights are not supported; "
                       "prune before sharding, or quantize it without masks.")
    found.append(i)
  return found


def _cluster_where_it_lies(path, leaf, imp, k, key, options, group_size, layout, granularity):
  """A sharded leaf clustered by the devices that hold it (per channel or per layer)."""
  sharding = sharding_lib.named_sharding(leaf)
  if granularity == "layer":
    _split_groups.check_options(path, k, options)
  if imp is not None and sharding_lib.named_sharding(imp) != sharding:
    warnings.warn(f"quantize: the importance of {path} is not sharded like the weight "
                  f"({getattr(imp, 'sharding', None)} vs {sharding}); resharding it.",
                  stacklevel=4)
    imp = jax.device_put(imp, sharding)
  options = tuple(sorted(options.items()))
  clusterer = _shard_local_clusterer
  try:
    hash(options)
  except TypeError:  # an unhashable option value: compile this call on its own
    clusterer = _shard_local_clusterer.__wrapped__
  run = clusterer(sharding, tuple(jnp.shape(leaf)), k, options, group_size, layout,
                  imp is not None, granularity)
  book, idx = run(key, leaf) if imp is None else run(key, leaf, imp)
  return ClusteredArray(book, idx, stacked=layout.stacked)


@functools.lru_cache(maxsize=64)
def _shard_local_clusterer(sharding, shape, k, options, group_size, layout, weighted,
                           granularity):
  """The jitted shard_map that clusters a leaf where it lies, made once per
  (sharding, shape, settings): quantize is often called again on the same
  model (re-clustering during training) and would otherwise compile it every
  call. Per channel, each device clusters its own channels; per layer, each
  layer's histograms and sums are summed over the devices holding its parts."""
  spec = sharding.spec
  in_specs = (P(),) + (spec,) * (2 if weighted else 1)
  if granularity == "layer":
    names = sharding_lib.split_axes("leaf", shape, sharding, layout.stacked)
    parts = sharding_lib.axis_size(sharding.mesh, names)
    layers, _, _ = _matrix(shape, layout, "layer")
    group = int(np.prod(shape)) // layers

    def split(key, w, h=None):
      x = jnp.asarray(w, jnp.float32).reshape(-1)
      h = None if h is None else h.reshape(-1)
      result = _split_groups.split_grouped_kmeans_1d(
          x, h, (group // parts,) * layers, (group,) * layers, k, axis_name=names, key=key,
          **dict(options))
      book = result.centroids.reshape(((1,) if layers == 1 else (layers, 1)) + (k,))
      return book, result.assignments.reshape(w.shape).astype(index_dtype(k))

    def gathered(key, w, h=None):
      whole = lambda a: None if a is None else sharding_lib.gather(a, spec)
      [q] = _cluster_scalars([whole(w)], [whole(h)], [k], [None], ["leaf"], "layer", None, key,
                             dict(options), None, [layout])
      return q.codebook, sharding_lib.own_part(q.indices, spec)

    # Layers of at most exact_up_to values take the exact DP over their sorted
    # values, as on one device: such a leaf is small, gathered and clustered whole.
    local = gathered if _split_groups.takes_exact_dp(group, options) else split
    return sharding_lib.shard_local(local, sharding, in_specs, (P(), spec))

  names = sharding_lib.channel_split("leaf", shape, sharding, layout.stacked, layout.channels)
  layers, fan_in, _ = _matrix(shape, layout, "channel")
  rows = layers * (fan_in // group_size if group_size is not None else 1)
  book_spec = sharding_lib.codebook_spec(names, 2 if rows == 1 else 3)
  local_shape = sharding.shard_shape(shape)

  def cluster(key, w, h=None):
    [q] = _cluster_scalars([w], [h], [k], [None], ["leaf"], "channel", None, key, dict(options),
                           group_size, [layout])
    return q.codebook, q.indices

  blocks = channel_blocks(local_shape, layout)
  local = cluster if blocks == 1 else in_channel_blocks(cluster, blocks, local_shape, layout,
                                                         rows, k)
  return sharding_lib.shard_local(local, sharding, in_specs, (book_spec, spec),
                                  in_blocks=blocks > 1)


# A device clusters its channels in about this many blocks, one after another, so
# that its working memory is one block's (the grouped clusterer's temporaries
# are several times the values they cluster), but no block under this size.
_CHANNEL_BLOCKS = 32
_MIN_BLOCK_VALUES = 1 << 16


def channel_blocks(shape, layout: LeafAxes) -> int:
  """How many blocks of (first-axis) output channels a leaf of ``shape`` is
  clustered in: a divisor of that axis, at least min(32, values / 2^16)."""
  first = len(shape) - layout.channels
  want = min(_CHANNEL_BLOCKS, int(np.prod(shape)) // _MIN_BLOCK_VALUES, shape[first])
  if want <= 1:
    return 1
  return next(d for d in range(want, shape[first] + 1) if shape[first] % d == 0)


def in_channel_blocks(cluster, blocks: int, shape, layout: LeafAxes, rows: int, k: int):
  """``cluster(key, w, h) -> (codebook, indices)`` run on ``blocks`` slices of
  the output channels one at a time. Each channel's codebook is the one it
  gets alone, so the result is the same as in one call, bit for bit."""
  first = len(shape) - layout.channels
  size = shape[first] // blocks
  channels = size * int(np.prod(shape[first + 1:]))
  book_axis = 0 if rows == 1 else 1

  def run(key, w, h=None):
    part = lambda a, i: None if a is None else jax.lax.dynamic_slice_in_dim(a, i * size, size,
                                                                             first)

    def body(i, out):
      book, idx = cluster(key, part(w, i), part(h, i))
      return (jax.lax.dynamic_update_slice_in_dim(out[0], book, i * channels, book_axis),
              jax.lax.dynamic_update_slice_in_dim(out[1], idx, i * size, first))

    book_shape = ((rows,) if rows > 1 else ()) + (channels * blocks, k)
    out = (jnp.zeros(book_shape, jnp.float32), jnp.zeros(shape, index_dtype(k)))
    return jax.lax.fori_loop(0, blocks, body, out)

  return run


def _cluster_vectors(path, leaf, imp, k, key, options, layout="vector"):
  a = jnp.asarray(leaf, jnp.float32)
  _vectors.check_conv_kernel(path, a.shape, layout)
  axis, vector_shape = _vectors.layout_of(a.shape, layout)
  points, rest = _vectors.to_points(a, axis, vector_shape)
  weights = None
  if imp is not None:
    weights = _vectors.to_points(jnp.asarray(imp, jnp.float32), axis, vector_shape)[0]
  allowed = {n: options[n] for n in ("init", "max_iter", "tol") if n in options}
  if allowed.get("init") not in (None, "kmeans++", "forgy"):
    allowed.pop("init")
  result = kmeans_vectors(points, weights, k, key=key, **allowed)
  if not is_traced(points):  # at most k distinct vectors: each its own entry (lossless)
    vectors, inverse = _distinct.distinct_vectors(np.asarray(points))
    if len(vectors) <= k:
      book = np.concatenate([vectors, np.repeat(vectors[-1:], k - len(vectors), axis=0)])
      result = Clustering(jnp.asarray(book), jnp.asarray(inverse, jnp.int32))
  idx = result.assignments.reshape(rest).astype(index_dtype(k))
  return ClusteredArray(result.centroids, idx, tuple(vector_shape), vector_axis=axis)
