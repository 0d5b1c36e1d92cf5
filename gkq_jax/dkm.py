"""Deep k-Means' k-means regulariser: retraining that gathers weights around K centres.

For one layer, let W be the d x N matrix whose columns are the N vectors that
weight sharing will cluster (d = 1 for scalars, kw for kernel rows, kh * kw for
whole filters), and F an N x K matrix with orthonormal columns, held fixed
between refreshes. Deep k-Means (Wu et al., ICML 2018) adds to the loss

    R(W) = strength / 2 * [tr(W^T W) - tr(F^T W^T W F)] = strength / 2 * ||W - W F F^T||^2,

whose gradient ``strength * (W - W F F^T)`` is computed as ``(W F) F^T``: no
N x N matrix is ever formed. ``strength`` is the paper's lambda. F is
refreshed every T steps in one of two forms:

  * ``form="indicator"``: F is the normalised indicator of a k-means of the
    current weights (F[n, k] = 1 / sqrt(n_k) when vector n is in cluster k),
    kept as the assignments. Then W F F^T replaces each vector by its
    cluster's mean and R is exactly strength / 2 x the within-cluster sum of
    squares: it pulls every weight toward its cluster's mean ("harder cluster
    assignments"). A refresh runs Lloyd steps from the current clusters.
  * ``form="spectral"``: the paper's relaxation, F = the top-K right singular
    vectors of W. It is informative only while K is below the rank of W,
    which is at most min(d, N): at K >= rank, W F F^T = W and R is
    identically zero. Scalars (d = 1) are always degenerate, kernel rows of a
    3x3 conv allow K <= 2, 5x5 filters K <= 24. Degenerate layers raise a
    ``ValueError`` (``on_degenerate="raise"``) or fall back to the indicator
    form with a warning (``on_degenerate="indicator"``).

Importance-weighted (our own; indicator form): with per-weight importance h
(mean g^2 or mean |g|, the quantizer's), R = strength / 2 * sum_n sum_j
h_jn (w_jn - c_jk(n))^2 with c the h-weighted cluster means, so retraining
pulls hardest the weights the loss cares about. h is scaled to mean 1 per
layer, so ``strength`` means the same with or without it.

Use it as a loss term in any loop (:func:`kmeans_regularizer`, refreshed by
:func:`refresh_kmeans_regularizer`), or as an optax transformation that adds
its gradient and refreshes F inside the optimiser state
(:func:`add_kmeans_regularizer`), which a checkpoint of the optimiser state
then carries: a resumed run continues with the same F.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gkq_jax import _vectors
from gkq_jax import rules as rules_lib
from gkq_jax._paths import map_with_paths, named_leaves
from gkq_jax.kmeans1d import kmeans_1d
from gkq_jax.kmeans_vectors import kmeans_vectors, weighted_sq_distances

FORMS = ("indicator", "spectral")
GRANULARITIES = ("layer", "row", "vector")  # scalars; kernel rows; spatial filters
ON_DEGENERATE = ("raise", "indicator")


class LayerSpec(NamedTuple):
  """What is regularised at one parameter (static: part of the state's tree structure)."""

  path: str
  granularity: str  # "layer" (scalars), "row" or "vector"
  num_clusters: int
  form: str  # "indicator" or "spectral"


@flax.struct.dataclass
class KMeansRegularizerState:
  """Per regularised parameter, in ``specs`` order: ``{"assignments": (N,) int32}``
  (indicator) or ``{"basis": (N, K) F}`` (spectral), plus ``"importance"``:
  (N, d) per-coordinate weights of mean 1 in the weighted form."""

  layers: tuple
  specs: tuple = flax.struct.field(pytree_node=False)


def check_strength(strength) -> None:
  if isinstance(strength, (int, float, np.number)) and not (
      math.isfinite(strength) and strength >= 0):
    raise ValueError(f"strength (the regulariser's lambda) must be a finite number >= 0, "
                     f"got {strength}.")


def check_refresh_every(refresh_every) -> None:
  if not isinstance(refresh_every, (int, np.integer)) or refresh_every < 1:
    raise ValueError(f"refresh_every (T, steps between refreshes of F) must be an integer "
                     f">= 1, got {refresh_every!r}.")


def _points(w, granularity: str):
  """(N, d) vectors of a parameter, in the order the quantizer indexes them."""
  if granularity == "layer":
    return jnp.reshape(w, (-1, 1))
  axis, shape = _vectors.layout_of(jnp.shape(w), granularity)
  return _vectors.to_points(w, axis, shape)[0]


def _dense(points, like, granularity: str):
  """Inverse of :func:`_points` for an (N, d) array shaped like the parameter ``like``."""
  if granularity == "layer":
    return points.reshape(jnp.shape(like))
  axis, shape = _vectors.layout_of(jnp.shape(like), granularity)
  rest = tuple(np.delete(np.asarray(jnp.shape(like)), range(axis, axis + len(shape))))
  return _vectors.from_vectors(points.reshape(rest + (-1,)), axis, shape)


# ------------------------------------------------------------------ set-up


def kmeans_regularizer_init(params: Any, rules: Sequence[rules_lib.ClusterRule],
                            importance: Any = None, *, form: str = "indicator",
                            granularity: str = "layer", on_degenerate: str = "raise",
                            key=None, max_iter: int = 100) -> KMeansRegularizerState:
  """The regulariser's state for the parameters the rules select (K from the rules).

  Args:
    params: a pytree of arrays.
    rules: :class:`gkq_jax.ClusterRule` s, as for :func:`gkq_jax.quantize`.
    importance: pytree like params (e.g. :func:`gkq_jax.compute_importance`)
      for the importance-weighted form, or None.
    form: "indicator" (k-means) or "spectral" (top-K right singular vectors).
    granularity: "layer" (scalars), "row" (kernel rows of conv kernels) or
      "vector" (spatial filters); "row" and "vector" reject Dense kernels.
    on_degenerate: for the spectral form at K >= rank: "raise" or
      "indicator" (use the indicator form for that layer, with a warning).
    key: PRNG key of the k-means starts.
    max_iter: Lloyd iterations of the first k-means.
  """
  if form not in FORMS:
    raise ValueError(f"form={form!r} is not one of {FORMS}.")
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}.")
  if on_degenerate not in ON_DEGENERATE:
    raise ValueError(f"on_degenerate={on_degenerate!r} is not one of {ON_DEGENERATE}.")
  if form == "spectral" and importance is not None:
    raise ValueError("importance weighting is defined for form='indicator' (weighted "
                     "within-cluster sums); pass importance=None or use form='indicator'.")
  rules_lib.check_rules(params, rules)
  named = named_leaves(params)
  imps = ([None] * len(named) if importance is None
          else jax.tree.structure(params).flatten_up_to(importance))
  key = jax.random.PRNGKey(0) if key is None else key
  layers, specs = [], []
  for n, ((path, leaf), imp) in enumerate(zip(named, imps)):
    k = rules_lib.clusters_for(rules, path, leaf)
    if k <= 0:
      continue
    if granularity != "layer":
      _vectors.check_conv_kernel(path, jnp.shape(leaf), granularity)
    points = np.asarray(_points(jnp.asarray(leaf, jnp.float32), granularity))
    weights = None
    if imp is not None:
      weights = np.asarray(_points(jnp.asarray(imp, jnp.float32), granularity), np.float64)
      if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"importance of {path} must be finite and >= 0.")
      mean = weights.mean()
      weights = np.ones_like(weights) if mean <= 0 else weights / mean
    layer_form = form
    if form == "spectral":
      rank = int(np.linalg.matrix_rank(points.T))
      if k >= rank:
        message = (f"form='spectral' at {path}: num_clusters={k} is at or above the rank "
                   f"{rank} of its {points.shape[1]} x {points.shape[0]} weight matrix, so "
                   "the top-K right singular vectors span all of it and the penalty is "
                   f"identically 0. Use form='indicator' or fewer than {rank} clusters")
        if on_degenerate == "raise":
          raise ValueError(message + " (or on_degenerate='indicator').")
        warnings.warn(message + "; using the indicator form for this layer.", stacklevel=2)
        layer_form = "indicator"
    sub = jax.random.fold_in(key, n)
    if layer_form == "spectral":
      state = {"basis": _top_right_singular_vectors(jnp.asarray(points), k)}
    else:
      state = {"assignments": _first_kmeans(points, weights, k, sub, max_iter)}
    if weights is not None:
      state["importance"] = jnp.asarray(weights, jnp.float32)
    layers.append(state)
    specs.append(LayerSpec(path, granularity, int(k), layer_form))
  if not specs:
    raise ValueError("no parameter is selected by the rules (check their patterns and "
                     "min_ndim).")
  return KMeansRegularizerState(tuple(layers), tuple(specs))


def _first_kmeans(points, weights, k, key, max_iter):
  if points.shape[1] == 1:
    h = None if weights is None else weights[:, 0]
    result = kmeans_1d(points[:, 0], h, num_clusters=k, key=key, max_iter=max_iter)
  else:
    result = kmeans_vectors(points, weights, k, key=key, max_iter=max_iter)
  return jnp.asarray(result.assignments, jnp.int32)


def _top_right_singular_vectors(points, k):
  """F (N, K): the top-K right singular vectors of W = points^T (d x N)."""
  _, _, vt = jnp.linalg.svd(points.T, full_matrices=False)
  return vt[:k].T


def merge_states(*states: KMeansRegularizerState) -> KMeansRegularizerState:
  """One state from states of disjoint parameters (e.g. conv rows + Dense scalars)."""
  paths = [s.path for state in states for s in state.specs]
  if len(set(paths)) != len(paths):
    raise ValueError("merge_states: a parameter is regularised twice.")
  return KMeansRegularizerState(sum((s.layers for s in states), ()),
                                sum((s.specs for s in states), ()))


# ------------------------------------------------------------- penalty and gradient


def _cluster_means(points, h, assignments, k):
  """h-weighted mean of each cluster's vectors (K, d); empty clusters at +inf."""
  mass = jax.ops.segment_sum(h, assignments, k)
  total = jax.ops.segment_sum(h * points, assignments, k)
  return jnp.where(mass > 0, total / jnp.where(mass > 0, mass, 1.0), jnp.inf)


def _residual(points, layer: dict, spec: LayerSpec):
  """(W - W F F^T) in the (N, d) layout, and the importance (N, d) or 1."""
  h = layer.get("importance", jnp.ones_like(points))
  if spec.form == "spectral":
    f = layer["basis"]
    return points - f @ (f.T @ points), h  # (W F) F^T, transposed: never N x N
  means = _cluster_means(points, h, layer["assignments"], spec.num_clusters)
  return points - means[layer["assignments"]], h


def _selected(params, state: KMeansRegularizerState) -> list:
  leaves = dict(named_leaves(params))
  missing = [s.path for s in state.specs if s.path not in leaves]
  if missing:
    raise ValueError(f"params have no leaf {missing[0]!r} that the regulariser state holds; "
                     "pass the params the state was made from.")
  return [leaves[s.path] for s in state.specs]


def kmeans_regularizer(params: Any, state: KMeansRegularizerState, strength) -> jax.Array:
  """R = strength / 2 * sum over layers of ||W - W F F^T||^2 (importance-weighted
  where the state has importance). Pure and jit-able: add it to a loss."""
  check_strength(strength)
  total = jnp.zeros((), jnp.float32)
  for w, layer, spec in zip(_selected(params, state), state.layers, state.specs):
    residual, h = _residual(_points(jnp.asarray(w, jnp.float32), spec.granularity), layer, spec)
    total = total + jnp.sum(h * residual * residual)
  return 0.5 * strength * total


def kmeans_regularizer_grad(params: Any, state: KMeansRegularizerState, strength) -> Any:
  """The gradient of :func:`kmeans_regularizer` in closed form, strength * h *
  (W - W F F^T), as a pytree like ``params`` (zeros where nothing is regularised)."""
  check_strength(strength)
  grads = {}
  for w, layer, spec in zip(_selected(params, state), state.layers, state.specs):
    w32 = jnp.asarray(w, jnp.float32)
    residual, h = _residual(_points(w32, spec.granularity), layer, spec)
    grads[spec.path] = _dense(strength * h * residual, w32, spec.granularity).astype(
        jnp.result_type(w))
  return map_with_paths(lambda path, w: grads.get(path, jnp.zeros_like(w)), params)


# ------------------------------------------------------------------ refresh


def refresh_kmeans_regularizer(params: Any, state: KMeansRegularizerState,
                               lloyd_steps: int = 5) -> KMeansRegularizerState:
  """F from the current weights: ``lloyd_steps`` importance-weighted Lloyd steps
  from the current clusters (indicator), or the SVD of W (spectral). Pure and
  jit-able; a cluster that empties stays empty."""
  layers = []
  for w, layer, spec in zip(_selected(params, state), state.layers, state.specs):
    points = _points(jnp.asarray(w, jnp.float32), spec.granularity)
    if spec.form == "spectral":
      layers.append({**layer, "basis": _top_right_singular_vectors(points, spec.num_clusters)})
      continue
    h = layer.get("importance", jnp.ones_like(points))

    def lloyd(_, assignments, points=points, h=h, k=spec.num_clusters):
      return _nearest(points, h, _cluster_means(points, h, assignments, k))

    assignments = jax.lax.fori_loop(0, lloyd_steps, lloyd, layer["assignments"])
    layers.append({**layer, "assignments": assignments})
  return state.replace(layers=tuple(layers))


def _nearest(points, h, means):
  """Each vector's nearest (h-weighted) mean; +inf means (empty clusters) are never chosen."""
  if points.shape[1] == 1:  # 1-D: nearest by the sorted midpoints, O(N log K) memory O(N)
    c = means[:, 0]
    order = jnp.argsort(c)
    ordered = c[order]
    mids = (ordered[1:] + ordered[:-1]) / 2
    return order[jnp.searchsorted(mids, points[:, 0])].astype(jnp.int32)
  finite = jnp.isfinite(means).all(axis=1)
  distances = weighted_sq_distances(points, h, jnp.where(finite[:, None], means, 0.0))
  return jnp.argmin(jnp.where(finite[None, :], distances, jnp.inf), axis=1).astype(jnp.int32)


# ------------------------------------------------------------------ optax


class KMeansRegularizerOptState(NamedTuple):
  count: jax.Array  # steps taken
  regularizer: KMeansRegularizerState


def strength_ramp(start: float, end: float, steps: int) -> optax.Schedule:
  """Geometric ramp of the strength from ``start`` to ``end`` over ``steps`` steps.

  A constant small strength leaves every weight at w = c - g / strength (the
  task gradient g holds it off its centre), and snapping it to c then costs
  about g^2 / strength of loss per weight; raising the strength as training
  goes lets the network adapt while its weights close onto the centres.
  """
  check_strength(start)
  check_strength(end)
  if start <= 0 or end <= 0:
    raise ValueError(f"strength_ramp needs start and end > 0 (geometric), got {start}, {end}.")
  if steps < 1:
    raise ValueError(f"strength_ramp: steps must be >= 1, got {steps}.")
  rate = math.log(end / start)
  return lambda count: start * jnp.exp(rate * jnp.minimum(count, steps) / steps)


def add_kmeans_regularizer(state: KMeansRegularizerState, strength: float | optax.Schedule,
                           refresh_every: int, lloyd_steps: int = 5
                           ) -> optax.GradientTransformation:
  """An optax transformation that adds the regulariser's gradient to the updates
  and refreshes F every ``refresh_every`` steps from the params it is given.

  ``strength`` is lambda, or a schedule of it (a function of the step, e.g.
  :func:`strength_ramp`). Put it first, like ``optax.add_decayed_weights``::

    tx = optax.chain(add_kmeans_regularizer(state, 1e-2, refresh_every=100), optax.adam(1e-3))

  F lives in the optimiser state, so a checkpoint of it resumes with the same F.
  """
  if not callable(strength):
    check_strength(strength)
  check_refresh_every(refresh_every)
  strength_at = strength if callable(strength) else (lambda count: strength)

  def init_fn(params):
    _selected(params, state)
    return KMeansRegularizerOptState(jnp.zeros([], jnp.int32), state)

  def update_fn(updates, opt_state, params=None):
    if params is None:
      raise ValueError("add_kmeans_regularizer needs the params: call "
                       "tx.update(grads, opt_state, params).")
    count, reg = opt_state
    due = jnp.logical_and(count > 0, count % refresh_every == 0)
    reg = jax.lax.cond(due, lambda r: refresh_kmeans_regularizer(params, r, lloyd_steps),
                       lambda r: r, reg)
    grads = kmeans_regularizer_grad(params, reg, strength_at(count))
    updates = jax.tree.map(lambda u, g: u + g.astype(u.dtype), updates, grads)
    return updates, KMeansRegularizerOptState(count + 1, reg)

  return optax.GradientTransformation(init_fn, update_fn)
