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


def _bitwise_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("per_channel,fold", [(True, False), (False, False), (True, True)])
def test_uniform_grids_take_two_numbers_per_channel(tmp_path, per_channel, fold):
  # The survey's qat_8bit on the digits MLP wrote 256 float32 levels per channel: a file
  # larger than the fp32 weights (issue 25). A grid is an offset and a scale per channel.
  rng = np.random.default_rng(0)
  params = {"Dense_0": {"kernel": rng.standard_normal((64, 300)).astype(np.float32),
                        "bias": np.zeros(300, np.float32)},
            "Dense_1": {"kernel": rng.standard_normal((300, 100)).astype(np.float32)}}
  folds = {"Dense_1/kernel": np.linspace(-2.0, 3.0, 100)} if fold else None  # BatchNorm's
  stored = gkq.uniform_codebooks(params, 8, per_channel=per_channel, fold_scales=folds)
  size, sizes = encode.save(tmp_path / "q.gkq", stored)
  fp32 = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
  assert size < fp32 * 0.3
  assert {sizes[p]["codebook"] for p in ("Dense_0/kernel", "Dense_1/kernel")} == {"grid"}
  back = encode.load(tmp_path / "q.gkq")
  fake = gkq.fake_quantize(params, 8, per_channel=per_channel, fold_scales=folds)
  for (path, x), (_, y), (_, z) in zip(gkq.named_leaves(gkq.dequantize(stored)),
                                       gkq.named_leaves(gkq.dequantize(back)),
                                       gkq.named_leaves(fake)):
    assert _bitwise_equal(x, y), path  # the file: bit for bit
    np.testing.assert_allclose(z, x, rtol=1e-6, atol=1e-7, err_msg=path)  # the levels trained
  for path, leaf in gkq.clustered_leaves(stored):
    assert gkq.stored_bytes(leaf) == sizes[path]["bytes"]


def _tiny_leaves():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((4, 6)).astype(np.float32)
  pruned = np.where(np.abs(w) > 0.3, w, np.float32(0))
  pruned[0] = w[0]  # no channel pruned whole
  conv = rng.standard_normal((3, 3, 2, 2)).astype(np.float32)
  fast = dict(method="lloyd", init="linear")
  return {
      "channel": gkq.quantize({"w": w}, None, [gkq.ClusterRule("w", 16)],
                              granularity="channel", **fast)["w"],
      "pinned": gkq.quantize({"w": pruned}, None, [gkq.ClusterRule("w", 4)],
                             masks={"w": pruned != 0}, granularity="channel", **fast)["w"],
      "bf16": gkq.quantize({"w": jax.numpy.asarray(w, jax.numpy.bfloat16)}, None,
                           [gkq.ClusterRule("w", 16)], granularity="channel", **fast)["w"],
      "filters": gkq.quantize({"c": conv}, None, [gkq.ClusterRule("c", 16)],
                              granularity="vector")["c"],
      "qat": gkq.uniform_codebook(w[:3], 8),
      "signed_zeros": gkq.ClusteredArray(np.array([[-0.0, 0.0, 1.0, 2.0]], np.float32),
                                         np.array([[0, 1], [2, 0]], np.uint8)),
      "big": gkq.quantize({"w": rng.standard_normal((64, 32)).astype(np.float32)}, None,
                          [gkq.ClusterRule("w", 8)], **fast)["w"],
  }


def test_no_leaf_takes_more_bytes_than_its_dense_weights(tmp_path):
  # A codebook that costs more than its indices save: the weights are stored as they are,
  # and come back as a ClusteredArray of the same layout that decodes bit for bit.
  tree = _tiny_leaves()
  _, sizes = encode.save(tmp_path / "m.gkq", tree)
  back = encode.load(tmp_path / "m.gkq")
  for name, leaf in tree.items():
    dense = np.asarray(leaf.dequantize())
    assert sizes[name]["bytes"] == gkq.stored_bytes(leaf) <= dense.nbytes, name
    # signed_zeros' codebook (-0, 0, 1, 2) is float16 numbers: 8 bytes, it fits.
    assert (sizes[name]["coding"] == "raw") == (name not in ("big", "qat", "signed_zeros")), name
    got = back[name]
    assert gkq.is_clustered(got), name
    assert got.codebook.shape == leaf.codebook.shape and got.pinned_zero == leaf.pinned_zero
    assert got.indices.dtype == leaf.indices.dtype and got.vector_shape == leaf.vector_shape
    assert _bitwise_equal(got.dequantize(), dense), name
  assert not np.any(np.asarray(back["pinned"].codebook)[:, 0])  # index 0 is still the zero
  assert sizes["qat"]["codebook"] == "grid"  # 8 bytes a channel instead of 1,024: it fits


def test_reads_format_version_2_files():
  # Written by the version-2 writer (float32 tables only): a pinned leaf, a grid-shaped
  # per-channel codebook, a raw bias and a tuple with None.
  back = encode.load(DATA / "format_v2.gkq")
  params = back["params"]
  expected = np.array([-1.0, 0.5, 2.0], np.float32)[(np.arange(24) * 7 % 3).reshape(4, 6)]
  np.testing.assert_array_equal(np.asarray(gkq.dequantize(params["Dense_0"]["kernel"])),
                                expected)
  np.testing.assert_array_equal(params["Dense_0"]["bias"], np.arange(6))
  assert params["Dense_1"]["kernel"].pinned_zero
  np.testing.assert_array_equal(np.asarray(params["Dense_2"]["kernel"].codebook),
                                [[-0.5, 0.0, 0.5, 1.0], [-1.0, 0.0, 1.0, 2.0]])
  assert back["step"][0] == 3 and back["step"][1] is None


def test_float16_codebooks_take_two_bytes_an_entry(tmp_path):
  rng = np.random.default_rng(3)
  w = rng.standard_normal((128, 16)).astype(np.float32)
  q = gkq.quantize({"w": w}, None, [gkq.bits_rule("w", 3)], granularity="channel")["w"]
  half = q.replace(codebook=jax.numpy.asarray(q.codebook, jax.numpy.float16).astype(np.float32))
  assert gkq.stored_bytes(q) - gkq.stored_bytes(half) == 2 * q.codebook.size
  _, sizes = encode.save(tmp_path / "h.gkq", {"w": half})
  assert sizes["w"]["codebook"] == "float16 table"
  back = encode.load(tmp_path / "h.gkq")["w"]
  assert _bitwise_equal(back.codebook, half.codebook)
  assert _bitwise_equal(gkq.dequantize(back), gkq.dequantize(half))
