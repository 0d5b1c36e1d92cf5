"""Packed indices (gkq_jax.packing): round trips, sizes, errors, and the packed tree as a pytree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gkq_jax as gkq


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_unpack_round_trip_every_width(bits):
  rng = np.random.default_rng(bits)
  shape = (3, 9, 5)  # 27 rows: not a whole number of 8-index words
  idx = rng.integers(0, 2 ** bits, shape)
  idx[0, 0, 0] = 2 ** bits - 1  # the largest index survives
  packed = gkq.pack_indices(idx, bits)
  np.testing.assert_array_equal(np.asarray(gkq.unpack_indices(packed, bits, shape, jnp.uint16)),
                                idx)
  # bits/8 bytes per index up to 4 bits (rows padded to whole words of 8), then 1, then 2.
  per_index = bits / 8 if bits <= 4 else (1 if bits <= 8 else 2)
  rows = 32 if bits <= 4 else 27
  assert packed.dtype == jnp.uint8 and packed.size == rows * 5 * per_index


@pytest.mark.parametrize("shape", [(), (5,), (17, 1), (1, 1, 1, 7)])
def test_pack_unpack_round_trip_odd_shapes(shape):
  idx = np.random.default_rng(0).integers(0, 8, shape)
  packed = gkq.pack_indices(idx, 3)
  np.testing.assert_array_equal(np.asarray(gkq.unpack_indices(packed, 3, shape)), idx)


def test_four_bit_indices_share_bytes_and_the_layout_is_slab_major():
  idx = np.arange(16 * 2).reshape(16, 2) % 16
  packed = np.asarray(gkq.pack_indices(idx, 4))
  assert packed.shape == (4, 2, 2)  # 4 bytes per word of 8 indices, 2 words per column
  word = sum(packed[b].astype(np.uint32) << (8 * b) for b in range(4))
  # word g of column n holds rows g, g + 2, g + 4, ... at 4 bits each
  np.testing.assert_array_equal((word[1, 0] >> 4 * np.arange(8)) & 15, idx[1::2, 0])


def test_pack_and_unpack_are_jittable():
  idx = np.random.default_rng(0).integers(0, 8, (10, 6))
  packed = jax.jit(gkq.pack_indices, static_argnums=1)(idx, 3)
  np.testing.assert_array_equal(np.asarray(packed), np.asarray(gkq.pack_indices(idx, 3)))
  out = jax.jit(lambda p: gkq.unpack_indices(p, 3, (10, 6)))(packed)
  np.testing.assert_array_equal(np.asarray(out), idx)


@pytest.fixture(scope="module")
def clustered():
  """A conv and a dense kernel clustered for real (pruned, one codebook per output channel,
  zero pinned), and the same tree with one hand-made codebook per layer."""
  params = {"conv": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (3, 3, 4, 6))},
            "dense": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (21, 5)),
                      "bias": jnp.zeros(5)}}
  masks = gkq.magnitude_masks(params, {"conv": {"kernel": True},
                                       "dense": {"kernel": True, "bias": False}}, quality=0.5)
  pruned = gkq.quantize(gkq.apply_masks(params, masks), None,
                        [gkq.ClusterRule("conv", 8), gkq.ClusterRule("dense", 5)],
                        granularity="channel", masks=masks)
  rng = np.random.default_rng(0)

  def per_layer(k, shape):
    return gkq.ClusteredArray(jnp.asarray(rng.standard_normal((1, k)), jnp.float32),
                              jnp.asarray(rng.integers(0, k, shape), jnp.uint8))

  layer = {"conv": {"kernel": per_layer(8, (3, 3, 4, 6))},
           "dense": {"kernel": per_layer(5, (21, 5)), "bias": params["dense"]["bias"]}}
  return {"pruned": pruned, "layer": layer}


@pytest.mark.parametrize("layout", ["layer", "pruned"])
def test_pack_tree_keeps_every_clustered_array(clustered, layout):
  q = clustered[layout]
  packed = gkq.pack_tree(q)
  leaves = [x for x in jax.tree.leaves(packed, is_leaf=gkq.is_packed) if gkq.is_packed(x)]
  assert len(leaves) == 2 and {x.bits for x in leaves} <= {2, 3}
  back = gkq.unpack_tree(packed)
  for (_, a), (_, b) in zip(gkq.clustered_leaves(q), gkq.clustered_leaves(back)):
    np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
    assert a.indices.dtype == b.indices.dtype and a.pinned_zero == b.pinned_zero
  np.testing.assert_array_equal(np.asarray(packed["conv"]["kernel"].dequantize()),
                                np.asarray(gkq.dequantize(q)["conv"]["kernel"]))
  assert packed["conv"]["kernel"].shape == (3, 3, 4, 6)
  assert packed["dense"]["bias"] is q["dense"]["bias"]


def test_vector_layout_packs_too():
  rng = np.random.default_rng(3)  # 3x3 filters of a (3, 3, 4, 8) kernel as 6 shared vectors
  c = gkq.ClusteredArray(jnp.asarray(rng.standard_normal((6, 9)), jnp.float32),
                         jnp.asarray(rng.integers(0, 6, (4, 8)), jnp.uint8), vector_shape=(3, 3))
  p = gkq.pack(c)
  assert p.shape == (3, 3, 4, 8) and p.bits == 3
  np.testing.assert_array_equal(np.asarray(p.dequantize()), np.asarray(c.dequantize()))


def test_packed_bytes_are_what_the_bits_say(clustered):
  p = gkq.pack(clustered["layer"]["dense"]["kernel"])  # 21 x 5, 5 clusters -> 3 bits
  assert p.bits == 3 and p.packed.shape == (3, 3, 5)  # 3 words of 8 rows per column
  assert gkq.pack(clustered["layer"]["dense"]["kernel"], bits=8).packed.shape == (1, 21, 5)


def test_too_few_bits_is_an_error_naming_the_leaf(clustered):
  with pytest.raises(ValueError, match=r"conv/kernel has 8 clusters, which need 3 bits; got "
                                       r"bits=2"):
    gkq.pack_tree(clustered["layer"], bits=2)
  with pytest.raises(ValueError, match="does not fit in bits=2"):
    gkq.pack_indices(np.array([0, 1, 4]), 2)
  with pytest.raises(ValueError, match="bits must be in 1..16"):
    gkq.pack_indices(np.array([0, 1]), 17)
  with pytest.raises(ValueError, match=r"need uint8 \(3, 1, 5\)"):
    gkq.unpack_indices(np.zeros((2, 1, 5), np.uint8), 3, (8, 5))


def test_packed_tree_is_a_pytree_for_jit_device_put_and_sharding(clustered):
  packed = gkq.pack_tree(clustered["pruned"])
  dense = jax.jit(lambda p: gkq.dequantize(gkq.unpack_tree(p)))(packed)
  np.testing.assert_array_equal(np.asarray(dense["dense"]["kernel"]),
                                np.asarray(gkq.dequantize(clustered["pruned"])["dense"]["kernel"]))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  placed = jax.device_put(packed, sharding)
  assert jax.tree.structure(placed) == jax.tree.structure(packed)
  assert placed["conv"]["kernel"].packed.sharding == sharding


def test_orbax_checkpoint_round_trip(clustered, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  packed = gkq.pack_tree(clustered["pruned"])
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "packed", packed)
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / "packed", jax.eval_shape(lambda: packed))
  assert jax.tree.structure(restored) == jax.tree.structure(packed)
  for a, b in zip(jax.tree.leaves(packed), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert restored["conv"]["kernel"].packed.dtype == jnp.uint8
