"""Deep k-Means' regulariser (gkq_jax.dkm): value, gradient, F, refreshes, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gkq_jax as gkq

RULES = [gkq.ClusterRule("kernel$", 4)]


@pytest.fixture(scope="module")
def params():
  rng = np.random.default_rng(0)
  return {"conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)},
          "dense": {"kernel": jnp.asarray(rng.standard_normal((30, 6)), jnp.float32),
                    "bias": jnp.zeros(6)}}


def _points(w, granularity):
  w = np.asarray(w, np.float64)
  if granularity == "layer":
    return w.reshape(-1, 1)
  return np.moveaxis(w, 1, -1).reshape(-1, w.shape[1])  # kernel rows of HWIO


def _sse(points, h, assignments, k):
  """Reference: importance-weighted within-cluster sum of squares, by loops."""
  total = 0.0
  for c in range(k):
    members, weights = points[assignments == c], h[assignments == c]
    if len(members):
      mean = (weights * members).sum(0) / weights.sum(0)
      total += (weights * (members - mean) ** 2).sum()
  return total


def _trace_form(points, f, strength):
  """Reference: lambda/2 [tr(W^T W) - tr(F^T W^T W F)] with W = points^T (d x N)."""
  w = points.T
  return strength / 2 * (np.trace(w.T @ w) - np.trace(f.T @ w.T @ w @ f))


def test_indicator_value_is_the_within_cluster_sse(params):
  state = gkq.kmeans_regularizer_init(params, RULES)
  assert [s.path for s in state.specs] == ["conv/kernel", "dense/kernel"]
  value = float(gkq.kmeans_regularizer(params, state, 0.7))
  expected = 0.0
  for spec, layer in zip(state.specs, state.layers):
    points = _points(dict(gkq.named_leaves(params))[spec.path], "layer")
    a = np.asarray(layer["assignments"])
    sse = _sse(points, np.ones_like(points), a, 4)
    # The normalised indicator F in the paper's trace form gives the same number.
    f = np.zeros((len(a), 4))
    for c in range(4):
      f[a == c, c] = 1 / np.sqrt(max(1, (a == c).sum()))
    assert _trace_form(points, f, 1.0) == pytest.approx(sse / 2, rel=1e-6)
    expected += 0.7 / 2 * sse
  assert value == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("case", ["plain", "weighted_rows", "spectral_rows"])
def test_gradient_matches_jax_grad(params, case):
  importance = jax.tree.map(lambda w: jnp.abs(w) + 0.1, params)
  state = {
      "plain": lambda: gkq.kmeans_regularizer_init(params, RULES),
      "weighted_rows": lambda: gkq.kmeans_regularizer_init(
          params, [gkq.ClusterRule("conv/kernel$", 4)], importance, granularity="row"),
      "spectral_rows": lambda: gkq.kmeans_regularizer_init(
          params, [gkq.ClusterRule("conv/kernel$", 2)], form="spectral", granularity="row"),
  }[case]()
  auto = jax.grad(gkq.kmeans_regularizer)(params, state, 1.3)
  closed = gkq.kmeans_regularizer_grad(params, state, 1.3)
  for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(closed)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  assert float(jnp.abs(closed["conv"]["kernel"]).max()) > 0


def test_weighted_value_uses_importance_weighted_means(params):
  importance = jax.tree.map(lambda w: w * w, params)
  state = gkq.kmeans_regularizer_init(params, [gkq.ClusterRule("conv/kernel$", 4)],
                                      importance, granularity="row")
  points = _points(params["conv"]["kernel"], "row")
  h = _points(importance["conv"]["kernel"], "row")
  h = h / h.mean()  # scaled to mean 1
  expected = _sse(points, h, np.asarray(state.layers[0]["assignments"]), 4) / 2
  assert float(gkq.kmeans_regularizer(params, state, 1.0)) == pytest.approx(expected, rel=1e-5)


def test_spectral_f_is_orthonormal_and_matches_the_trace_form(params):
  state = gkq.kmeans_regularizer_init(params, [gkq.ClusterRule("conv/kernel$", 2)],
                                      form="spectral", granularity="row")
  f = np.asarray(state.layers[0]["basis"], np.float64)
  assert f.shape == (3 * 4 * 5, 2)  # N rows of length kw = 3
  np.testing.assert_allclose(f.T @ f, np.eye(2), atol=1e-5)
  points = _points(params["conv"]["kernel"], "row")
  assert float(gkq.kmeans_regularizer(params, state, 2.0)) == pytest.approx(
      _trace_form(points, f, 2.0), rel=1e-4)


def test_degenerate_spectral_raises_or_falls_back(params):
  with pytest.raises(ValueError, match=r"num_clusters=3 is at or above the rank 3"):
    gkq.kmeans_regularizer_init(params, [gkq.ClusterRule("conv/kernel$", 3)],
                                form="spectral", granularity="row")
  with pytest.raises(ValueError, match="rank 1"):  # scalars: W is 1 x N
    gkq.kmeans_regularizer_init(params, RULES, form="spectral")
  with pytest.warns(UserWarning, match="indicator form"):
    state = gkq.kmeans_regularizer_init(params, RULES, form="spectral",
                                        on_degenerate="indicator")
  assert {s.form for s in state.specs} == {"indicator"}


def test_bad_input_names_the_parameter(params):
  state = gkq.kmeans_regularizer_init(params, RULES)
  with pytest.raises(ValueError, match=r"strength \(the regulariser's lambda\)"):
    gkq.kmeans_regularizer(params, state, -1.0)
  with pytest.raises(ValueError, match=r"strength"):
    gkq.add_kmeans_regularizer(state, -0.1, 10)
  for bad in (0, -3, 2.5):
    with pytest.raises(ValueError, match=r"refresh_every \(T"):
      gkq.add_kmeans_regularizer(state, 0.1, bad)
  with pytest.raises(ValueError, match=r"granularity='row'.*dense/kernel"):
    gkq.kmeans_regularizer_init(params, RULES, granularity="row")
  with pytest.raises(ValueError, match="form='indicator'"):
    gkq.kmeans_regularizer_init(params, RULES, params, form="spectral")


def test_refresh_follows_the_weights_and_optax_adds_the_gradient(params):
  state = gkq.kmeans_regularizer_init(params, RULES)
  # Move half of the dense weights far away: a refresh reassigns them.
  moved = jax.tree.map(lambda w: w, params)
  moved["dense"]["kernel"] = params["dense"]["kernel"].at[:15].add(6.0)
  refreshed = jax.jit(gkq.refresh_kmeans_regularizer)(moved, state)
  assert float(gkq.kmeans_regularizer(moved, refreshed, 1.0)) < float(
      gkq.kmeans_regularizer(moved, state, 1.0))
  np.testing.assert_array_equal(  # unchanged weights keep their clusters
      np.asarray(refreshed.layers[0]["assignments"]), np.asarray(state.layers[0]["assignments"]))

  tx = gkq.add_kmeans_regularizer(state, 0.5, refresh_every=2)
  opt_state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, opt_state = tx.update(zeros, opt_state, params)
  expected = gkq.kmeans_regularizer_grad(params, state, 0.5)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b))
  assert int(opt_state.count) == 1
  # Step 2 (count 2) refreshes F from the params it is given.
  _, opt_state = tx.update(zeros, opt_state, moved)
  _, opt_state = tx.update(zeros, opt_state, moved)
  np.testing.assert_array_equal(np.asarray(opt_state.regularizer.layers[1]["assignments"]),
                                np.asarray(refreshed.layers[1]["assignments"]))


def test_retraining_with_the_regulariser_gathers_weights(params):
  state = gkq.kmeans_regularizer_init(params, RULES)
  tx = optax.chain(gkq.add_kmeans_regularizer(state, 1.0, refresh_every=5), optax.sgd(0.2))
  opt_state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.zeros_like, p), s, p))
  p = params
  for _ in range(20):
    updates, opt_state = step(p, opt_state)
    p = optax.apply_updates(p, updates)
  before = float(gkq.kmeans_regularizer(params, state, 1.0))
  after = float(gkq.kmeans_regularizer(p, opt_state[0].regularizer, 1.0))
  assert after < 0.05 * before  # (1 - 0.2)^20 ~ 0.01 of the within-cluster spread is left


def test_strength_ramp_schedule(params):
  ramp = gkq.strength_ramp(0.1, 10.0, 4)
  np.testing.assert_allclose([float(ramp(c)) for c in (0, 2, 4, 9)], [0.1, 1.0, 10.0, 10.0],
                             rtol=1e-5)
  state = gkq.kmeans_regularizer_init(params, RULES)
  tx = gkq.add_kmeans_regularizer(state, ramp, refresh_every=100)
  zeros = jax.tree.map(jnp.zeros_like, params)
  opt_state = tx.init(params)
  first, opt_state = tx.update(zeros, opt_state, params)
  for _ in range(3):
    _, opt_state = tx.update(zeros, opt_state, params)
  fourth, _ = tx.update(zeros, opt_state, params)  # count 4: the end of the ramp
  np.testing.assert_allclose(np.asarray(fourth["dense"]["kernel"]),
                             100 * np.asarray(first["dense"]["kernel"]), rtol=1e-4)
  with pytest.raises(ValueError, match="start and end > 0"):
    gkq.strength_ramp(0.0, 1.0, 10)
