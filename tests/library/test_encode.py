"""The compressed file (gkq_jax.encode): round trips and damaged files."""

import jax
import numpy as np
import pytest

import gkq_jax as gkq
from gkq_jax import encode


@pytest.mark.parametrize("case", ["truncated", "flipped", "newer", "not_ours"])
def test_damaged_files_raise_clear_errors(tmp_path, case):
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (40, 30)), "b": np.zeros(3)}
  q = gkq.quantize(params, None, [gkq.ClusterRule("w", 8)])
  path = tmp_path / "m.gkq"
  encode.save(path, q)
  data = bytearray(path.read_bytes())
  if case == "truncated":
    data = data[:-100]
    match = "truncated or corrupted"
  elif case == "flipped":
    data[len(data) // 2] ^= 0x10
    match = "truncated or corrupted"
  elif case == "newer":
    data[len(encode.MAGIC)] = encode.FORMAT_VERSION + 1
    match = "format version"
  else:
    data = b"PK\x03\x04" + data[4:]
    match = "not a gkq_jax compressed file"
  path.write_bytes(bytes(data))
  with pytest.raises(encode.CorruptFileError, match=match):
    encode.load(path)


@pytest.mark.parametrize("k,density", [(2, 1.0), (16, 1.0), (256, 1.0), (32, 0.05), (4, 0.3)])
def test_every_coding_round_trips_exactly(tmp_path, k, density):
  rng = np.random.default_rng(k)
  w = rng.standard_normal((123, 77)).astype(np.float32)
  w[rng.random(w.shape) > density] = 0
  mask = w != 0
  q = gkq.quantize({"w": w}, None, [gkq.ClusterRule("w", k)],
                   masks={"w": mask} if density < 1 else None)
  size, sizes = encode.save(tmp_path / "m.gkq", q)
  back = encode.load(tmp_path / "m.gkq")
  np.testing.assert_array_equal(np.asarray(gkq.dequantize(back)["w"]),
                                np.asarray(gkq.dequantize(q)["w"]))
  if density < 0.1:
    assert sizes["w"]["coding"] == "sparse"


def test_a_leaf_with_every_weight_on_its_pinned_zero_round_trips(tmp_path):
  # ECSQ or a re-assignment can send every weight of a pruned layer to zero: the
  # sparse coding then has no gaps to code.
  w = np.zeros((20, 6), np.float32)
  leaf = gkq.ClusteredArray(np.array([[0.0, 0.5]], np.float32), np.zeros(w.shape, np.uint8),
                            pinned_zero=True)
  encode.save(tmp_path / "m.gkq", {"w": leaf})
  back = encode.load(tmp_path / "m.gkq")
  np.testing.assert_array_equal(np.asarray(gkq.dequantize(back)["w"]), w)


DATA = __import__("pathlib").Path(__file__).parent / "data"


def test_tree_comes_back_as_saved(tmp_path):
  # "a/b" next to a nested a -> b (both were written, one came back), a Haiku-style
  # "/" key, a list, a tuple, integer keys, None and a bfloat16 leaf.
  w = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
  tree = {"a/b": np.full(2, 1.0, np.float32), "a": {"b": np.full(3, 2.0, np.float32)},
          "mlp/~/linear_0": {"w": w}, "blocks": [{"w": 2 * w}, np.ones(2, np.int8)],
          "pair": (np.zeros(1), None), "by_index": {0: 3 * w, 1: np.arange(3)},
          "half": np.ones(4, jax.numpy.bfloat16)}
  q = gkq.quantize(tree, None, [gkq.ClusterRule("w$|^by_index/0$", 4)])
  size, sizes = encode.save(tmp_path / "m.gkq", q)
  assert {"a%2Fb", "a/b", "mlp%2F~%2Flinear_0/w", "blocks/0/w", "by_index/0"} <= set(sizes)
  back = encode.load(tmp_path / "m.gkq")
  assert jax.tree.structure(back, is_leaf=gkq.is_clustered) == jax.tree.structure(
      q, is_leaf=gkq.is_clustered)
  for (path, x), (_, y) in zip(gkq.named_leaves(gkq.dequantize(q)),
                               gkq.named_leaves(gkq.dequantize(back))):
    assert np.asarray(x).dtype == np.asarray(y).dtype, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unrepresentable_key_raises_at_save(tmp_path):
  with pytest.raises(ValueError, match=r"key \(1, 2\).*str or int"):
    encode.save(tmp_path / "m.gkq", {(1, 2): np.zeros(2)})
  assert not (tmp_path / "m.gkq").exists()


def test_reads_format_version_1_files():
  # Written by the version-1 writer (paths joined with '/', no stored structure).
  back = encode.load(DATA / "format_v1.gkq")
  kernel = back["params"]["Dense_0"]["kernel"]
  expected = np.array([-1.0, 0.5, 2.0], np.float32)[(np.arange(24) * 7 % 3).reshape(4, 6)]
  np.testing.assert_array_equal(np.asarray(gkq.dequantize(kernel)), expected)
  np.testing.assert_array_equal(back["params"]["Dense_0"]["bias"], np.arange(6))
