"""One of two processes of a jax.distributed job on localhost (run by
tests/library/test_sharding.py): a kernel split by output channel across the
two processes, compressed where it lies (per channel and per layer), fine-tuned
one step, written as a sharded file set and as an orbax checkpoint, and read
back; every result is compared, shard by shard, with what one device computes
from the whole array.

  python two_process_checks.py <process id> <port> <shared folder>
"""

import json
import pathlib
import sys

import jax

jax.config.update("jax_platforms", "cpu")
jax.distributed.initialize(coordinator_address="localhost:" + sys.argv[2], num_processes=2,
                           process_id=int(sys.argv[1]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import gkq_jax as gkq  # noqa: E402

folder = pathlib.Path(sys.argv[3])
mesh = Mesh(np.array(jax.devices()), ("model",))
split = NamedSharding(mesh, P(None, "model"))
rng = np.random.default_rng(0)  # the same arrays in both processes
W = rng.standard_normal((96, 64)).astype(np.float32)
H = (np.abs(W) + 0.1).astype(np.float32)
G = np.cos(W).astype(np.float32)
RULES = [gkq.bits_rule("kernel", 3)]


def global_array(a):
  return jax.make_array_from_callback(a.shape, split, lambda index: a[index])


def same_shards(array, whole) -> bool:
  """Every shard this process holds equals the same block of ``whole``."""
  whole = np.asarray(whole)
  return all(np.array_equal(np.asarray(s.data), whole[s.index])
             for s in array.addressable_shards)


def step(params, state, grads, tx):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates)


out = {"processes": jax.process_count(), "devices": jax.device_count(),
       "local_channels": [int(s.data.shape[1]) for s in global_array(W).addressable_shards]}
one = gkq.quantize({"kernel": jnp.asarray(W)}, {"kernel": jnp.asarray(H)}, RULES,
                   granularity="channel")
many = gkq.quantize({"kernel": global_array(W)}, {"kernel": global_array(H)}, RULES,
                    granularity="channel")
out["indices"] = same_shards(many["kernel"].indices, one["kernel"].indices)
out["codebook"] = same_shards(many["kernel"].codebook, one["kernel"].codebook)
dense = jax.jit(gkq.dequantize)(many)
out["dequantize"] = same_shards(dense["kernel"], gkq.dequantize(one)["kernel"])
tx_many = optax.chain(optax.sgd(0.05, momentum=0.9), gkq.share_centroids(many))
tx_one = optax.chain(optax.sgd(0.05, momentum=0.9), gkq.share_centroids(one))
one_dense = gkq.dequantize(one)
after_one = jax.jit(lambda p, s, g: step(p, s, g, tx_one))(
    one_dense, tx_one.init(one_dense), {"kernel": jnp.asarray(G)})
after_many = jax.jit(lambda p, s, g: step(p, s, g, tx_many))(
    dense, tx_many.init(dense), {"kernel": global_array(G)})
out["step"] = same_shards(after_many["kernel"], after_one["kernel"])

# Per layer: each process histograms its half, the histograms are summed across them.
one_layer = gkq.quantize({"kernel": jnp.asarray(W)}, {"kernel": jnp.asarray(H)}, RULES)
many_layer = gkq.quantize({"kernel": global_array(W)}, {"kernel": global_array(H)}, RULES)
out["layer_indices"] = same_shards(many_layer["kernel"].indices, one_layer["kernel"].indices)
mine = np.asarray(many_layer["kernel"].codebook.addressable_shards[0].data)
out["layer_codebook_difference"] = float(np.max(np.abs(mine - np.asarray(
    one_layer["kernel"].codebook))))
out["step_spec"] = str(after_many["kernel"].sharding.spec)

written = gkq.save_sharded(folder / "file", many)
multihost_utils.sync_global_devices("written")
back = gkq.load_sharded(folder / "file", gkq.shardings_of(many))
out["file_bytes"] = written["bytes"]
out["file_indices"] = same_shards(back["kernel"].indices, one["kernel"].indices)
out["file_codebook"] = same_shards(back["kernel"].codebook, one["kernel"].codebook)
out["file_spec"] = str(back["kernel"].indices.sharding.spec)

checkpointer = ocp.StandardCheckpointer()
checkpointer.save(folder / "orbax", many)
checkpointer.wait_until_finished()
target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                      many)
restored = checkpointer.restore(folder / "orbax", target)
out["orbax_indices"] = same_shards(restored["kernel"].indices, one["kernel"].indices)
out["orbax_spec"] = str(restored["kernel"].indices.sharding.spec)
print(json.dumps(out))
