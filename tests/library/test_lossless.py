"""Lossless where users expect it (issue 25, item 2): a group with at most K distinct
values (an already-shared or int8 model re-clustered, a tiny layer) decodes to exactly
its values, whatever the method and granularity, and so does the file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gkq_jax as gkq

# Values a mean relative to the group's centre used to move by an ulp or two (0.3 came
# back as 0.29999995); -0.0 and 0.0 are the same value to clustering.
LEVELS = np.array([0.3, -0.7, 1.1, 0.05, 0.0, -0.0, 2.5], np.float32)
FAST = dict(method="lloyd", init="linear")  # k-means options that compile quickly


def _shared(shape, seed=0, levels=LEVELS):
  return levels[np.random.default_rng(seed).integers(0, len(levels), shape)]


def _assert_decodes_to(quantized, params):
  for (path, got), (_, want) in zip(gkq.named_leaves(gkq.dequantize(quantized)),
                                    gkq.named_leaves(params)):
    assert np.asarray(got).dtype == np.asarray(want).dtype, path
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=path)


def _round_trip(tmp_path, quantized):
  gkq.save(tmp_path / "m.gkq", quantized)
  back = gkq.load(tmp_path / "m.gkq")
  for (path, x), (_, y) in zip(gkq.named_leaves(gkq.dequantize(quantized)),
                               gkq.named_leaves(gkq.dequantize(back))):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path  # bit for bit
  return back


@pytest.mark.parametrize("granularity,options", [
    ("layer", {}), ("layer", FAST), ("layer", {"method": "exact"}),
    ("layer", {"objective": "l1", **FAST}), ("channel", FAST),
    ("channel", {"group_size": 10, **FAST}), ("model", FAST),
    ("combined", {"budget": 200, **FAST})])
def test_groups_with_at_most_k_distinct_values_decode_exactly(tmp_path, granularity, options):
  params = {"a": {"kernel": _shared((40, 30))}, "b": {"kernel": _shared((20, 10), 1) * 3},
            "b16": {"kernel": jnp.asarray(_shared((10, 8), 2), jnp.bfloat16)}}
  # "model" shares one codebook: room for the union of the three layers' values.
  k = 24 if granularity == "model" else 8
  q = gkq.quantize(params, None, [gkq.ClusterRule(num_clusters=k)], granularity=granularity,
                   **options)
  _assert_decodes_to(q, params)
  _round_trip(tmp_path, q)


def test_pruned_leaves_vectors_and_per_channel_calls_decode_exactly(tmp_path):
  w = _shared((40, 30))
  masks = {"w": w != np.float32(0.3)}
  pruned = {"w": np.where(masks["w"], w, np.float32(0))}
  q = gkq.quantize(pruned, None, [gkq.ClusterRule("w", 8)], masks=masks, **FAST)
  assert q["w"].pinned_zero
  _assert_decodes_to(q, pruned)
  conv = {"conv": {"kernel": _shared((3, 3, 4, 8), 3, LEVELS[:2])}}
  for granularity in ("vector", "row"):  # 32 filters, at most 2**3 distinct rows
    q = gkq.quantize(conv, None, [gkq.ClusterRule(num_clusters=32)], granularity=granularity)
    _assert_decodes_to(q, conv)
    _round_trip(tmp_path, q)
  leaf = gkq.cluster_per_channel(w, None, 8, chunk_values=400, **FAST)
  np.testing.assert_array_equal(np.asarray(leaf.dequantize()), w)


@pytest.mark.parametrize("methods", [("kmeans",), ("ecsq",), ("uniform",)])
def test_byte_budget_candidates_with_room_for_every_value_are_exact(tmp_path, methods):
  params = {"a": {"kernel": _shared((40, 30))}, "b": {"kernel": _shared((30, 20), 1) * 3}}
  out = gkq.quantize_to_budget(params, None, [gkq.ClusterRule()], 100_000, methods=methods,
                               clusters=(2, 8), ecsq_clusters=8, points=3, **FAST)
  assert all(c.distortion == 0 for c in out.choices), out.choices
  _assert_decodes_to(out.quantized, params)
  _round_trip(tmp_path, out.quantized)


def test_more_distinct_values_than_clusters_are_still_clustered():
  w = np.random.default_rng(0).standard_normal((40, 30)).astype(np.float32)
  q = gkq.quantize({"w": w}, None, [gkq.ClusterRule("w", 8)], **FAST)
  assert len(np.unique(np.asarray(q["w"].dequantize()))) <= 8
  # A group of 7 values and 8 clusters (each value its own centroid), far from 0: exact.
  small = jax.random.normal(jax.random.PRNGKey(1), (7,)) * 1e3
  out = gkq.quantize({"s": small.reshape(7, 1)}, None, [gkq.ClusterRule("s", 8, min_ndim=1)],
                     **FAST)
  np.testing.assert_array_equal(np.asarray(out["s"].dequantize()).ravel(), np.asarray(small))
