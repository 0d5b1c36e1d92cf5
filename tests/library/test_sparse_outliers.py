"""Dense-and-sparse (SqueezeLLM): a fraction of a clustered weight kept exactly
in a sparse part, the rest clustered without it (issue 22)."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gkq_jax as gkq
from gkq_jax import encode

RULES = [gkq.ClusterRule(r"kernel", 4)]


def _weights(shape=(32, 8), seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape).astype(np.float32)
  h = rng.uniform(0.1, 2.0, shape).astype(np.float32)
  return jnp.asarray(w), jnp.asarray(h)


def _quantize(w, h=None, **options):
  q = gkq.quantize({"kernel": w}, None if h is None else {"kernel": h}, RULES, **options)
  return q["kernel"]


def _top(score, n):
  return np.sort(np.argsort(-np.asarray(score).reshape(-1), kind="stable")[:n])


def _grid_leaf(w, fraction, k=4):
  """A per-channel ClusteredArray on a uniform grid whose largest |w| are kept
  exactly, without k-means (what the file, the runtime and fine-tuning read)."""
  w = jnp.asarray(w)
  flat = w.reshape(-1, w.shape[-1])
  lo, hi = flat.min(axis=0), flat.max(axis=0)
  book = lo[:, None] + (hi - lo)[:, None] * jnp.linspace(0.0, 1.0, k)[None, :]
  idx = jnp.rint((w - lo) / (hi - lo) * (k - 1)).astype(jnp.uint8).reshape(-1)
  n = round(fraction * w.size)
  if not n:
    return gkq.ClusteredArray(book, idx.reshape(w.shape), dtype=np.dtype(w.dtype))
  pos = jnp.asarray(_top(jnp.abs(w.astype(jnp.float32)), n), jnp.int32)
  sparse = gkq.SparseOutliers(pos, w.reshape(-1)[pos])
  return gkq.ClusteredArray(book, idx.at[pos].set(0).reshape(w.shape), dtype=np.dtype(w.dtype),
                            sparse=sparse)


@pytest.mark.parametrize("granularity,group_size", [("layer", None), ("channel", None),
                                                    ("channel", 8)])
def test_the_kept_weights_are_exact_and_the_rest_decode_from_their_codebooks(granularity,
                                                                              group_size):
  w, h = _weights()
  leaf = _quantize(w, h, granularity=granularity, group_size=group_size, sparse_fraction=0.1)
  pos = np.asarray(leaf.sparse.positions)
  assert pos.dtype == np.int32 and pos.size == round(0.1 * w.size)
  assert np.all(np.diff(pos) > 0)
  dense = np.asarray(leaf.dequantize()).reshape(-1)
  np.testing.assert_array_equal(dense[pos], np.asarray(w).reshape(-1)[pos])
  # Everywhere else: the codebook's value, as the same leaf without its sparse part.
  clustered = np.asarray(leaf.replace(sparse=None).dequantize()).reshape(-1)
  rest = np.setdiff1d(np.arange(w.size), pos)
  np.testing.assert_array_equal(dense[rest], clustered[rest])
  assert not np.array_equal(dense[pos], clustered[pos])
  assert np.all(np.asarray(leaf.indices).reshape(-1)[pos] == 0)
  np.testing.assert_array_equal(gkq.dequantize({"k": leaf})["k"].reshape(-1), dense)
  np.testing.assert_array_equal(jax.jit(gkq.dequantize)({"k": leaf})["k"].reshape(-1), dense)


def test_the_kept_set_is_the_top_fraction_by_score():
  w, h = _weights()
  n = round(0.05 * w.size)
  by_sensitivity = _quantize(w, h, sparse_fraction=0.05)
  np.testing.assert_array_equal(by_sensitivity.sparse.positions, _top(h * w * w, n))
  by_magnitude = _quantize(w, h, sparse_fraction=0.05, sparse_by="magnitude")
  np.testing.assert_array_equal(by_magnitude.sparse.positions, _top(jnp.abs(w), n))
  assert not np.array_equal(by_sensitivity.sparse.positions, by_magnitude.sparse.positions)

  # Per matrix: the fraction of each leaf (sensitivity without importance: magnitude);
  # global: the top of all leaves together.
  small, _ = _weights((16, 8), seed=1)
  params = {"a": {"kernel": w}, "b": {"kernel": 2 * small}}
  per_matrix = gkq.quantize(params, None, RULES, sparse_fraction=0.05)
  np.testing.assert_array_equal(per_matrix["a"]["kernel"].sparse.positions,
                                by_magnitude.sparse.positions)
  np.testing.assert_array_equal(per_matrix["b"]["kernel"].sparse.positions,
                                _top(jnp.abs(small), round(0.05 * small.size)))
  assert per_matrix["b"]["kernel"].sparse.count == round(0.05 * small.size)
  both = gkq.quantize(params, None, RULES, sparse_fraction=0.05, sparse_by="magnitude",
                      sparse_scope="global")
  everything = np.concatenate([np.abs(w).reshape(-1), np.abs(2 * small).reshape(-1)])
  top = _top(everything, round(0.05 * everything.size))
  np.testing.assert_array_equal(both["a"]["kernel"].sparse.positions, top[top < w.size])
  np.testing.assert_array_equal(both["b"]["kernel"].sparse.positions,
                                top[top >= w.size] - w.size)
  assert both["b"]["kernel"].sparse.count > per_matrix["b"]["kernel"].sparse.count
  assert both["a"]["kernel"].sparse.count < per_matrix["a"]["kernel"].sparse.count
  # A leaf that keeps none has no sparse part.
  none = gkq.quantize({"a": {"kernel": w}, "b": {"kernel": 10 * small}}, None, RULES,
                      sparse_fraction=0.05, sparse_by="magnitude", sparse_scope="global")
  assert none["a"]["kernel"].sparse is None and none["b"]["kernel"].sparse.count == 19


def test_pruned_weights_are_never_kept():
  w, _ = _weights()
  mask = np.abs(np.asarray(w)) < 1.5  # prunes the largest: they would be kept otherwise
  q = gkq.quantize({"kernel": w}, None, RULES, masks={"kernel": mask}, sparse_fraction=0.05)
  leaf = q["kernel"]
  assert leaf.pinned_zero and leaf.sparse.count == round(0.05 * w.size)
  assert mask.reshape(-1)[np.asarray(leaf.sparse.positions)].all()
  dense = np.asarray(leaf.dequantize())
  assert np.all(dense[~mask] == 0)


def test_the_clustering_ignores_the_kept_weights():
  # One huge outlier: clustered with the rest it takes a centroid of its own (or drags one);
  # kept exactly, the codebook is what the other weights alone give, bit for bit.
  w, _ = _weights((8, 8))
  w = w.at[2, 5].set(1000.0)
  plain = _quantize(w)
  assert float(jnp.max(plain.codebook)) > 100
  leaf = _quantize(w, sparse_fraction=1 / 64)
  np.testing.assert_array_equal(leaf.sparse.positions, [2 * 8 + 5])
  assert float(jnp.max(leaf.codebook)) < 10
  others = np.delete(np.asarray(w).reshape(-1), 2 * 8 + 5)
  alone = gkq.quantize({"kernel": jnp.asarray(others)}, None,
                       [gkq.ClusterRule("kernel", 4, min_ndim=1)])["kernel"]
  np.testing.assert_array_equal(leaf.codebook, alone.codebook)
  rest = np.delete(np.asarray(leaf.dequantize()).reshape(-1), 2 * 8 + 5)
  np.testing.assert_array_equal(rest, np.asarray(alone.dequantize()))
  # Per channel: the outlier's channel is fitted to its other weights only.
  per_channel = _quantize(w, granularity="channel", sparse_fraction=1 / 64)
  assert float(jnp.max(per_channel.codebook)) < 10


def test_cluster_per_channel_keeps_them_too():
  w, h = _weights()
  w = w.at[3, 1].set(500.0)
  leaf = gkq.cluster_per_channel(w, h, 4, sparse_fraction=0.05)
  pos = np.asarray(leaf.sparse.positions)
  np.testing.assert_array_equal(pos, _top(h * w * w, round(0.05 * w.size)))
  np.testing.assert_array_equal(np.asarray(leaf.dequantize()).reshape(-1)[pos],
                                np.asarray(w).reshape(-1)[pos])
  assert float(jnp.max(leaf.codebook)) < 10


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.1", True, None])
def test_a_bad_sparse_fraction_is_an_error(bad):
  w, _ = _weights((8, 8))
  with pytest.raises(ValueError, match=r"sparse_fraction must be a number in \[0, 1\)"):
    _quantize(w, sparse_fraction=bad)


def test_other_bad_sparse_options_are_errors():
  w, _ = _weights((8, 8))
  with pytest.raises(ValueError, match="sparse_by='size' is not one of"):
    _quantize(w, sparse_fraction=0.1, sparse_by="size")
  with pytest.raises(ValueError, match="sparse_scope='model' is not one of"):
    _quantize(w, sparse_fraction=0.1, sparse_scope="model")
  conv, _ = _weights((3, 3, 2, 4))
  with pytest.raises(ValueError, match="granularity='vector' clusters vectors"):
    _quantize(conv, sparse_fraction=0.1, granularity="vector")
  with pytest.raises(ValueError, match="budget_bytes does not take sparse_fraction"):
    _quantize(w, sparse_fraction=0.1, budget_bytes=100)
  with pytest.raises(ValueError, match="sparse_fraction must be a number"):
    gkq.cluster_per_channel(w, None, 4, sparse_fraction=1.0)


# ------------------------------------------------------------------------ the file


def test_the_file_round_trips_the_sparse_part_and_grows_with_it(tmp_path):
  w, _ = _weights((64, 16))
  sizes = []
  for fraction in (0.0, 0.02, 0.1):
    leaf = _grid_leaf(w, fraction)
    q = {"dense": {"kernel": leaf, "bias": jnp.zeros(16)}}
    size, per_leaf = gkq.save(tmp_path / "m.gkq", q)
    assert per_leaf["dense/kernel"]["bytes"] == gkq.stored_bytes(leaf)
    back = gkq.load(tmp_path / "m.gkq")["dense"]["kernel"]
    np.testing.assert_array_equal(gkq.dequantize(back), leaf.dequantize())
    np.testing.assert_array_equal(back.indices, leaf.indices)
    if fraction:
      assert per_leaf["dense/kernel"]["sparse"] == round(fraction * w.size)
      kept = np.asarray(leaf.sparse.positions)
      np.testing.assert_array_equal(np.asarray(gkq.dequantize(back)).reshape(-1)[kept],
                                    np.asarray(w).reshape(-1)[kept])
      np.testing.assert_array_equal(back.sparse.positions, leaf.sparse.positions)
      np.testing.assert_array_equal(back.sparse.values, leaf.sparse.values)
      # Its bytes: the clustered part (indices there left out) + positions + values.
      costs = encode._clustered_costs(leaf)
      assert costs.values == leaf.sparse.count * 4 and 0 < costs.positions < costs.values
      assert gkq.stored_bytes(leaf) == costs.clustered
    else:
      assert back.sparse is None
    sizes.append((size, gkq.stored_bytes(leaf)))
  assert sizes[0][0] < sizes[1][0] < sizes[2][0]
  assert sizes[0][1] < sizes[1][1] < sizes[2][1]
  assert (tmp_path / "m.gkq").read_bytes()[len(encode.MAGIC)] == 4 == encode.FORMAT_VERSION


def test_the_file_keeps_a_bfloat16_sparse_part_and_a_leaf_stored_dense(tmp_path):
  w, _ = _weights((64, 16))
  q = {"k": _grid_leaf(w.astype(jnp.bfloat16), 0.05)}
  assert q["k"].sparse.values.dtype == jnp.bfloat16
  gkq.save(tmp_path / "b.gkq", q)
  back = gkq.load(tmp_path / "b.gkq")["k"]
  assert back.sparse.values.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(gkq.dequantize(back)).view(np.uint16),
                                np.asarray(q["k"].dequantize()).view(np.uint16))
  # A tiny leaf with many clusters is stored dense; it keeps its sparse positions.
  tiny = _grid_leaf(w[:4, :3], 0.2, k=16)
  _, per_leaf = gkq.save(tmp_path / "t.gkq", {"k": tiny})
  assert per_leaf["k"]["codebook"] == "none (dense)"
  assert per_leaf["k"]["bytes"] == gkq.stored_bytes(tiny) < 12 * 4 + 4
  back = gkq.load(tmp_path / "t.gkq")["k"]
  np.testing.assert_array_equal(back.sparse.positions, tiny.sparse.positions)
  np.testing.assert_array_equal(gkq.dequantize(back), tiny.dequantize())


def test_varints_round_trip():
  values = np.array([0, 1, 127, 128, 300, 16383, 16384, 2 ** 31 - 1])
  data = encode._varint_encode(values)
  assert len(data) == 1 + 1 + 1 + 2 + 2 + 2 + 3 + 5
  np.testing.assert_array_equal(encode._varint_decode(data, values.size, "x"), values)
  with pytest.raises(encode.CorruptFileError):
    encode._varint_decode(data[:-1], values.size, "x")


# ------------------------------------------------------------------- the runtime


class Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8)(nn.relu(nn.Dense(16)(x)))


def test_the_packed_runtime_equals_dequantize():
  model = Tiny()
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 12))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]
  params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].at[4, 2].set(5.0)
  q = gkq.quantize(params, None, RULES, granularity="channel", sparse_fraction=0.05)
  dense = model.apply({"params": gkq.dequantize(q)}, x)
  packed = gkq.pack_tree(q)
  assert packed["Dense_0"]["kernel"].sparse is not None
  assert packed["Dense_0"]["kernel"].nbytes > gkq.pack(q["Dense_0"]["kernel"].replace(
      sparse=None)).nbytes
  y = jax.jit(lambda p, x: gkq.apply_packed(model, {"params": p}, x, kernel="xla"))(packed, x)
  np.testing.assert_array_equal(y, dense)
  np.testing.assert_array_equal(gkq.dequantize(gkq.unpack_tree(packed))["Dense_0"]["kernel"],
                                gkq.dequantize(q)["Dense_0"]["kernel"])
  # Without the sparse part the outputs differ: the kept weights matter.
  stripped = jax.tree.map(lambda a: a.replace(sparse=None) if gkq.is_packed(a) else a, packed,
                          is_leaf=gkq.is_packed)
  assert not np.allclose(gkq.apply_packed(model, {"params": stripped}, x, kernel="xla"), dense)

  # nnx: the same through merge_packed.
  graphdef, state = nnx.split(nnx.Linear(12, 16, rngs=nnx.Rngs(0)))
  nq = jax.tree.map(lambda a: _grid_leaf(a, 0.05) if a.ndim == 2 else a, state)
  layer = gkq.merge_packed(graphdef, gkq.pack_tree(nq), kernel="xla")
  np.testing.assert_array_equal(layer(x), nnx.merge(graphdef, gkq.dequantize(nq))(x))


class Step(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(8, use_bias=False)(x), None


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(Step, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return scan(name="layers")(x, None)[0]


def test_a_packed_stack_keeps_each_layers_sparse_part():
  model = Stack()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]
  kernel = params["layers"]["Dense_0"]["kernel"]  # (3, 8, 8)
  params["layers"]["Dense_0"]["kernel"] = kernel.at[1].multiply(10.0)  # layer 1 keeps the most
  q = gkq.quantize(params, None, RULES, axes=gkq.layer_axes(model, x), sparse_fraction=0.05,
                   sparse_by="magnitude")
  leaf = q["layers"]["Dense_0"]["kernel"]
  assert leaf.stacked == 1
  packed = gkq.pack_tree(q)
  part = packed["layers"]["Dense_0"]["kernel"].sparse
  assert part.positions.shape == (3, leaf.sparse.count)  # layer 1 holds them all, the rest pad
  unpacked = packed["layers"]["Dense_0"]["kernel"].dequantize()
  np.testing.assert_array_equal(unpacked, leaf.dequantize())
  pos = np.asarray(leaf.sparse.positions)
  big = np.asarray(params["layers"]["Dense_0"]["kernel"]).reshape(-1)
  np.testing.assert_array_equal(np.asarray(unpacked).reshape(-1)[pos], big[pos])
  assert np.all(pos // 64 == 1)
  back = gkq.unpack_tree(packed)["layers"]["Dense_0"]["kernel"]
  np.testing.assert_array_equal(back.sparse.positions, leaf.sparse.positions)
  y = jax.jit(lambda p, x: gkq.apply_packed(model, {"params": p}, x, kernel="xla"))(packed, x)
  np.testing.assert_allclose(y, model.apply({"params": gkq.dequantize(q)}, x), rtol=1e-6,
                             atol=1e-6)


def test_the_lookup_table_kernel_adds_the_kept_weights_as_a_sparse_correction():
  w, _ = _weights((128, 16))
  leaf = _grid_leaf(w, 0.02)
  packed = gkq.pack(leaf)
  assert gkq.lut_unsupported(packed) is None
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 128))
  want = x @ leaf.dequantize()
  np.testing.assert_allclose(gkq.lut_matmul(x, packed), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gkq.lut_matmul_reference(x, packed), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- fine-tuning


def test_kept_weights_are_free_under_share_centroids_and_refresh_reads_them_back():
  w, _ = _weights()
  q = {"kernel": _grid_leaf(w, 0.05)}
  leaf = q["kernel"]
  params = gkq.dequantize(q)
  tx = optax.chain(optax.sgd(0.1), gkq.share_centroids(q))
  grads = {"kernel": jax.random.normal(jax.random.PRNGKey(3), w.shape)}
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  pos = np.asarray(leaf.sparse.positions)
  flat = lambda t: np.asarray(t["kernel"]).reshape(-1)  # noqa: E731
  # Each kept weight followed its own update.
  np.testing.assert_array_equal(flat(new)[pos],
                                flat(params)[pos] + np.float32(-0.1) * flat(grads)[pos])
  # The clustered ones moved by their cluster's mean update, the kept ones not counted.
  idx = np.asarray(leaf.indices)
  free = np.zeros(w.size, bool)
  free[pos] = True
  free = free.reshape(w.shape)
  for c in range(w.shape[1]):
    for j in range(4):
      members = (idx[:, c] == j) & ~free[:, c]
      if members.any():
        moved = np.asarray(new["kernel"])[members, c]
        assert np.all(moved == moved[0])
        np.testing.assert_allclose(moved[0] - float(leaf.codebook[c, j]),
                                   -0.1 * np.asarray(grads["kernel"])[members, c].mean(),
                                   rtol=1e-4, atol=1e-6)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fresh = gkq.refresh_codebooks(q, new)
  np.testing.assert_array_equal(gkq.dequantize(fresh)["kernel"], new["kernel"])
  np.testing.assert_array_equal(fresh["kernel"].sparse.values, flat(new)[pos])


def test_reassign_leaves_the_kept_weights_where_they_are():
  w, h = _weights()
  q = {"kernel": _grid_leaf(w, 0.05)}
  pos = np.asarray(q["kernel"].sparse.positions)
  moved = {"kernel": w * 1.01}
  again = gkq.reassign(moved, q, {"kernel": h})["kernel"]
  np.testing.assert_array_equal(np.asarray(again.dequantize()).reshape(-1)[pos],
                                np.asarray(moved["kernel"]).reshape(-1)[pos])
  assert np.all(np.asarray(again.indices).reshape(-1)[pos] == 0)
  snapped = gkq.fake_reassign(moved, q)["kernel"]
  np.testing.assert_array_equal(np.asarray(snapped).reshape(-1)[pos],
                                np.asarray(moved["kernel"]).reshape(-1)[pos])


def test_a_vector_leaf_with_a_sparse_part_dequantizes_and_round_trips(tmp_path):
  # quantize makes sparse parts for scalar layouts only, but every layout applies one.
  rng = np.random.default_rng(0)
  book = jnp.asarray(rng.standard_normal((4, 9)).astype(np.float32))  # 3x3 filters
  idx = jnp.asarray(rng.integers(0, 4, (2, 5)).astype(np.uint8))  # (in, out)
  kept = gkq.SparseOutliers(jnp.asarray([0, 17, 89], jnp.int32),
                            jnp.asarray([9.0, -9.0, 7.5], jnp.float32))
  leaf = gkq.ClusteredArray(book, idx, (3, 3), sparse=kept)
  dense = np.asarray(leaf.dequantize())
  assert dense.shape == (3, 3, 2, 5)
  np.testing.assert_array_equal(dense.reshape(-1)[[0, 17, 89]], [9.0, -9.0, 7.5])
  np.testing.assert_array_equal(
      np.delete(dense.reshape(-1), [0, 17, 89]),
      np.delete(np.asarray(leaf.replace(sparse=None).dequantize()).reshape(-1), [0, 17, 89]))
  _, per_leaf = gkq.save(tmp_path / "v.gkq", {"k": leaf})
  assert per_leaf["k"]["bytes"] == gkq.stored_bytes(leaf)
  back = gkq.load(tmp_path / "v.gkq")["k"]
  np.testing.assert_array_equal(back.indices, leaf.indices)
  np.testing.assert_array_equal(back.dequantize(), dense)
