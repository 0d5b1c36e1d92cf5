"""error_feedback_indices: GPTQ's row-by-row error feedback with any codebook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gkq_jax as gkq
from gkq_jax.error_feedback import error_feedback_indices


def _setup(seed=0, rows=48, channels=6, correlated=True):
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((rows, rows)) if correlated else np.eye(rows)
  x = (rng.standard_normal((512, rows)) @ mix).astype(np.float32)
  w = rng.standard_normal((rows, channels)).astype(np.float32)
  q = gkq.quantize({"w": jnp.asarray(w)}, None, [gkq.bits_rule("w", 2)], granularity="channel")
  return x, w, q["w"], jnp.asarray(x.T @ x / len(x))


def _output_error(x, w, clustered):
  return float(np.sum((x @ (w - np.asarray(gkq.dequantize(clustered)))) ** 2))


def test_feedback_lowers_the_output_error_and_keeps_the_codebooks():
  x, w, nearest, h = _setup()
  fed = jax.jit(error_feedback_indices)(w, nearest, h)
  np.testing.assert_array_equal(fed.codebook, nearest.codebook)
  assert fed.indices.dtype == nearest.indices.dtype
  # 15% lower here; the channels' codebooks are their exact optima (48 values each),
  # so nearest assignment is already as good as the codebook allows.
  assert _output_error(x, w, fed) < 0.9 * _output_error(x, w, nearest)


def test_uncorrelated_inputs_give_the_nearest_entries():
  _, w, nearest, _ = _setup(correlated=False)
  fed = error_feedback_indices(w, nearest, jnp.eye(w.shape[0]) * 3.0)
  np.testing.assert_array_equal(fed.indices, nearest.indices)


def test_per_layer_and_grouped_codebooks():
  x, w, _, h = _setup(seed=1)
  layer = gkq.quantize({"w": jnp.asarray(w)}, None, [gkq.bits_rule("w", 2)])["w"]
  assert _output_error(x, w, error_feedback_indices(w, layer, h)) < _output_error(x, w, layer)
  # Groups of 16 rows: each row reads its own group's codebook (the feedback need not help
  # there: a small group's codebook hugs its values and moved rows can fall outside it).
  grouped = gkq.quantize({"w": jnp.asarray(w)}, None, [gkq.bits_rule("w", 2)],
                         granularity="channel", group_size=16)["w"]
  fed = error_feedback_indices(w, grouped, jnp.eye(w.shape[0]))
  np.testing.assert_array_equal(fed.indices, grouped.indices)


def test_wrong_shapes_are_named():
  _, w, q, h = _setup()
  with pytest.raises(ValueError, match=r"needs \(48, 48\)"):
    error_feedback_indices(w, q, h[:10, :10])
  with pytest.raises(ValueError, match="2-D"):
    error_feedback_indices(w.reshape(4, 12, 6), q, h)


def test_refit_codebooks_lowers_the_output_error():
  from gkq_jax.error_feedback import refit_codebooks
  x, w, nearest, h = _setup(seed=2)
  fed = error_feedback_indices(w, nearest, h)
  refit = jax.jit(refit_codebooks)(w, fed, h)
  np.testing.assert_array_equal(refit.indices, fed.indices)
  assert _output_error(x, w, refit) < 0.95 * _output_error(x, w, fed)
  layer = gkq.quantize({"w": jnp.asarray(w)}, None, [gkq.bits_rule("w", 2)])["w"]
  assert refit_codebooks(w, layer, h).codebook.shape == (1, 4)
  assert _output_error(x, w, refit_codebooks(w, layer, h)) < _output_error(x, w, layer)
