"""Byte budgets split across layers (gkq_jax.allocation)."""

import itertools

import jax
import numpy as np
import pytest

import gkq_jax as gkq

CLUSTERS = (2, 4, 8)
FAST = dict(method="lloyd", init="linear")  # k-means options that compile quickly


@pytest.fixture(scope="module")
def model():
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": rng.standard_normal((40, 30)).astype(np.float32) * 0.1,
                  "bias": np.zeros(30, np.float32)},
            "b": {"kernel": rng.laplace(size=(30, 20)).astype(np.float32) * 0.3},
            "c": {"kernel": rng.standard_normal((20, 10)).astype(np.float32)}}
  importance = jax.tree.map(lambda w: (rng.random(w.shape) ** 3).astype(np.float32), params)
  importance["b"]["kernel"] *= 10  # layers matter unequally
  return params, importance


def _file_bytes(tmp_path, quantized):
  _, sizes = gkq.save(tmp_path / "m.gkq", quantized)
  return {path: sizes[path]["bytes"] for path, _ in gkq.clustered_leaves(quantized)}


def test_coded_bytes_are_the_files(tmp_path):
  """Fixed width, Huffman and the sparse relative index, each where it wins."""
  rng = np.random.default_rng(2)
  leaves = {
      "uniform": (rng.integers(0, 16, 3000), 16, False),
      "skewed": (np.minimum(rng.geometric(0.4, 3000) - 1, 11), 12, False),
      "sparse": (np.where(rng.random(5000) < 0.06, rng.integers(1, 5, 5000), 0), 5, True),
      "long_gaps": (np.where(rng.random(9000) < 0.004, 1, 0), 2, True),
  }
  # Squares of a linspace from 0, over 3: the pinned zero of the sparse leaves, no uniform
  # grid (which the file would store as two numbers) and no float16 numbers (two bytes an
  # entry), so the codebooks are float32 tables.
  tree = {name: gkq.ClusteredArray(np.linspace(0, 1, k, dtype=np.float32)[None] ** 2
                                   * np.float32(1 / 3),
                                   idx.astype(np.uint8), pinned_zero=pin)
          for name, (idx, k, pin) in leaves.items()}
  _, sizes = gkq.save(tmp_path / "m.gkq", tree)
  assert {sizes[n]["coding"] for n in leaves} == {"fixed", "huffman", "sparse"}
  for name, (idx, k, pin) in leaves.items():
    assert gkq.coded_bytes(idx, k, sparse=pin) + 4 * k == sizes[name]["bytes"], name
    assert gkq.stored_bytes(tree[name]) == sizes[name]["bytes"], name


def test_allocate_is_optimal_against_brute_force():
  rng = np.random.default_rng(3)
  rates = rng.integers(5, 60, size=(4, 5)).astype(float)
  dist = rng.random((4, 5)) * 10
  rates[1, 2] = np.inf  # a setting a layer cannot have
  for budget in (45, 75, 110, 160, 240):
    picked = gkq.allocate(rates, dist, budget)
    best = min((sum(dist[l, s] for l, s in enumerate(combo)), combo)
               for combo in itertools.product(range(5), repeat=4)
               if sum(rates[l, s] for l, s in enumerate(combo)) <= budget)
    assert sum(rates[l, s] for l, s in enumerate(picked)) <= budget
    assert sum(dist[l, s] for l, s in enumerate(picked)) == pytest.approx(best[0])


def test_budget_is_met_and_optimal_over_the_k_means_candidates(tmp_path, model):
  """Brute force over every per-layer K, with sizes from real files."""
  params, importance = model
  per_k = {}
  for k in CLUSTERS:  # each K for all layers: the same grouped call the allocation makes
    q = gkq.quantize(params, importance, [gkq.ClusterRule("kernel$", k)], **FAST)
    sizes = _file_bytes(tmp_path, q)
    dense = gkq.dequantize(q)
    per_k[k] = {path: (sizes[path], float(np.sum(
        np.asarray(dict(gkq.named_leaves(importance))[path])
        * (np.asarray(dict(gkq.named_leaves(params))[path])
           - np.asarray(dict(gkq.named_leaves(dense))[path])) ** 2))) for path in sizes}
  paths = sorted(per_k[2])
  chosen = {}
  for budget in (500, 700, 1000):
    out = gkq.quantize_to_budget(params, importance, [gkq.ClusterRule("kernel$")], budget,
                                 methods=("kmeans",), clusters=CLUSTERS, **FAST)
    sizes = _file_bytes(tmp_path, out.quantized)
    assert sum(sizes.values()) <= budget
    assert [c.bytes for c in out.choices] == [sizes[c.path] for c in out.choices]
    best = min(sum(per_k[k][p][1] for k, p in zip(combo, paths))
               for combo in itertools.product(CLUSTERS, repeat=len(paths))
               if sum(per_k[k][p][0] for k, p in zip(combo, paths)) <= budget)
    assert sum(c.distortion for c in out.choices) == pytest.approx(best, rel=1e-5)
    chosen[budget] = {c.path: c.num_clusters for c in out.choices}
  # A tight budget goes to the important layer b first, not by size.
  assert chosen[500]["b/kernel"] > chosen[500]["a/kernel"]
  assert chosen[1000] == {"a/kernel": 8, "b/kernel": 8, "c/kernel": 8}


def test_ecsq_and_pruned_layers_within_budget(tmp_path, model):
  params, importance = model
  masks = jax.tree.map(lambda w: np.abs(w) > 0.8 * np.abs(w).std(), params)
  same = gkq.quantize_to_budget(params, importance, [gkq.ClusterRule("kernel$")], 600,
                                methods=("ecsq",), allocation="same", masks=masks,
                                clusters=CLUSTERS, ecsq_clusters=8, **FAST)
  optimal = gkq.quantize_to_budget(params, importance, [gkq.ClusterRule("kernel$")], 600,
                                   methods=("ecsq",), masks=masks, ecsq_clusters=8, points=4,
                                   **FAST)
  for out in (same, optimal):
    assert sum(_file_bytes(tmp_path, out.quantized).values()) <= 600
    for path, leaf in gkq.clustered_leaves(out.quantized):  # pruned weights stay exactly zero
      keep = np.asarray(dict(gkq.named_leaves(masks))[path])
      assert leaf.pinned_zero and np.all(np.asarray(leaf.dequantize())[~keep] == 0)
  assert len({c.setting for c in same.choices}) == 1  # one price for all layers
  # The optimum includes every run the "same" search made, so it is never worse.
  assert (sum(c.distortion for c in optimal.choices)
          <= sum(c.distortion for c in same.choices) * (1 + 1e-6))


def test_quantize_takes_budget_bytes(model):
  params, importance = model
  q = gkq.quantize(params, importance, [gkq.ClusterRule("kernel$")], budget_bytes=900,
                   methods=("kmeans",), clusters=CLUSTERS, **FAST)
  assert len(gkq.clustered_leaves(q)) == 3
  with pytest.raises(ValueError, match="granularity"):
    gkq.quantize(params, None, [gkq.ClusterRule("kernel$")], budget_bytes=900,
                 granularity="channel")


@pytest.mark.parametrize("budget, message", [
    (50, "below the smallest possible size"),
    (-3, "budget_bytes must be a positive"),
])
def test_bad_budget(model, budget, message):
  params, importance = model
  with pytest.raises(ValueError, match=message):
    gkq.quantize_to_budget(params, importance, [gkq.ClusterRule("kernel$")], budget,
                           methods=("kmeans",), clusters=CLUSTERS, **FAST)
