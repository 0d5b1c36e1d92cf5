"""Run by tests/library/test_sharding.py in a fresh process with N simulated CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX
starts); prints one JSON object of findings. Not collected by pytest."""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import gkq_jax as gkq
from gkq_jax import sharding as sharding_lib

mesh = Mesh(np.array(jax.devices()), ("model",))
rng = np.random.default_rng(0)
PARAMS = {"mlp": {"kernel": jnp.asarray(rng.standard_normal((96, 64)), jnp.float32)},
          "q": {"kernel": jnp.asarray(rng.standard_normal((32, 8, 16)), jnp.bfloat16)}}
SPECS = {"mlp": {"kernel": P(None, "model")}, "q": {"kernel": P(None, "model", None)}}
RULES = [gkq.bits_rule("mlp/kernel", 3), gkq.bits_rule("q/kernel", 3, channel_axes=2)]
IMPORTANCE = jax.tree.map(lambda w: jnp.abs(w.astype(jnp.float32)) + 0.1, PARAMS)


def shard(tree):
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, SPECS)


def gathers(fn, *args) -> list[int]:
  """Bytes of the result of every all-gather in ``fn``'s compiled program."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  sizes = []
  for line in text.splitlines():
    if "all-gather(" in line or "all-gather-start(" in line:
      shape = re.search(r"= \(?(\w+)\[([\d,]*)\]", line)
      if shape:
        dims = [int(d) for d in shape.group(2).split(",") if d]
        sizes.append(int(np.prod(dims)) * (2 if shape.group(1) in ("bf16", "f16") else 4))
  return sizes


def specs(tree):
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(p): str(x.sharding.spec) for p, x in leaves}


def equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
  out = {"devices": len(jax.devices())}
  sp, si = shard(PARAMS), shard(IMPORTANCE)
  weight_bytes = min(int(np.prod(x.shape)) * x.dtype.itemsize // len(jax.devices())
                     for x in jax.tree.leaves(sp))
  for group_size in (None, 16):
    tag = f"gs{group_size}"
    one = gkq.quantize(PARAMS, IMPORTANCE, RULES, granularity="channel", group_size=group_size)
    many = gkq.quantize(sp, si, RULES, granularity="channel", group_size=group_size)
    out[f"{tag}/quantize_equal"] = equal(one, many)
    # Quantizing the same sharded model again reuses the compiled shard-local program.
    quantize_lib = sys.modules["gkq_jax.quantize"]  # the module (gkq.quantize is the function)
    misses = quantize_lib._shard_local_clusterer.cache_info().misses
    again = gkq.quantize(sp, si, RULES, granularity="channel", group_size=group_size)
    out[f"{tag}/requantize_compiles"] = (
        quantize_lib._shard_local_clusterer.cache_info().misses - misses)
    out[f"{tag}/requantize_equal"] = equal(again, many)
    out[f"{tag}/quantize_specs"] = specs(many)
    dense = jax.jit(gkq.dequantize)(many)
    out[f"{tag}/dequantize_equal"] = equal(gkq.dequantize(one), dense)
    out[f"{tag}/dequantize_specs"] = specs(dense)
    out[f"{tag}/dequantize_gathers"] = gathers(gkq.dequantize, many)
    tx = optax.chain(optax.adam(0.01), gkq.keep_pruned(optax.identity(), jax.tree.map(
        lambda w: jnp.ones(w.shape, bool), dense)), gkq.share_centroids(many))
    state = tx.init(dense)
    grads = jax.tree.map(lambda w: jnp.cos(w.astype(jnp.float32)).astype(w.dtype), dense)

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    stepped, _ = jax.jit(step)(dense, state, grads)
    out[f"{tag}/step_specs"] = specs(stepped)
    out[f"{tag}/step_gathers"] = gathers(step, dense, state, grads)
    one_tx = optax.chain(optax.adam(0.01), gkq.share_centroids(one))
    one_dense = gkq.dequantize(one)
    one_step, _ = jax.jit(lambda p, s, g: (optax.apply_updates(
        p, one_tx.update(g, s, p)[0]), s))(one_dense, one_tx.init(one_dense), grads)
    out[f"{tag}/step_equal"] = equal(one_step, stepped)
    refreshed = jax.jit(gkq.refresh_codebooks)(many, stepped)
    out[f"{tag}/refresh_specs"] = specs(refreshed)
    out[f"{tag}/refresh_gathers"] = gathers(gkq.refresh_codebooks, many, stepped)
    out[f"{tag}/pack_specs"] = specs(gkq.pack_tree(many))

  loss = lambda p, b: jnp.sum(jnp.tanh(0.1 * b @ p["mlp"]["kernel"]))
  batches = [jnp.asarray(rng.standard_normal((4, 96)), jnp.float32) for _ in range(2)]
  imp = gkq.compute_importance(loss, {"mlp": sp["mlp"]}, batches)
  out["importance_specs"] = specs(imp)
  alone = gkq.compute_importance(loss, {"mlp": PARAMS["mlp"]}, batches)
  a, b = np.asarray(imp["mlp"]["kernel"]), np.asarray(alone["mlp"]["kernel"])
  out["importance_max_relative_difference"] = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
  one = gkq.cluster_per_channel(PARAMS["mlp"]["kernel"], IMPORTANCE["mlp"]["kernel"], 8)
  many = gkq.cluster_per_channel(sp["mlp"]["kernel"], si["mlp"]["kernel"], 8)
  out["per_channel_equal"] = equal(one, many)
  out["per_channel_specs"] = specs(many)
  out["weight_shard_bytes"] = weight_bytes
  out.update(per_layer())
  out.update(in_blocks())
  out.update(bad_input())
  print(json.dumps(out))


def in_blocks() -> dict:
  """Per-channel clustering of a device's channels block by block (as large shards
  are, to bound memory), forced here on small ones: still one device's result."""
  quantize_lib = sys.modules["gkq_jax.quantize"]
  saved = quantize_lib._MIN_BLOCK_VALUES
  quantize_lib._MIN_BLOCK_VALUES = 64
  quantize_lib._shard_local_clusterer.cache_clear()
  found = {"blocks": [quantize_lib.channel_blocks((96, 16), gkq.LeafAxes()),
                      quantize_lib.channel_blocks((32, 2, 16), gkq.LeafAxes(channels=2))]}
  try:
    for group_size in (None, 16):
      one = gkq.quantize(PARAMS, IMPORTANCE, RULES, granularity="channel", group_size=group_size)
      many = gkq.quantize(shard(PARAMS), shard(IMPORTANCE), RULES, granularity="channel",
                          group_size=group_size)
      found[f"blocks_gs{group_size}_equal"] = equal(one, many)
      found[f"blocks_gs{group_size}_specs"] = specs(many)
  finally:
    quantize_lib._MIN_BLOCK_VALUES = saved
    quantize_lib._shard_local_clusterer.cache_clear()
  return found


def per_layer() -> dict:
  """Per-layer codebooks of sharded leaves: histograms summed over the devices."""
  found = {}
  grid = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
  rules = RULES[:1] + [gkq.bits_rule("q/kernel", 3, stacked_axes=1)]
  layouts = {"split": SPECS, "grid": {"mlp": {"kernel": P("data", "model")},
                                      "q": {"kernel": P(None, ("data", "model"), None)}}}
  one = gkq.quantize(PARAMS, IMPORTANCE, rules)
  for name, tree_specs in layouts.items():
    mesh_ = mesh if name == "split" else grid
    put = lambda tree: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh_, s)),
                                    tree, tree_specs)
    sp, si = put(PARAMS), put(IMPORTANCE)
    many = gkq.quantize(sp, si, rules)
    found[f"layer_{name}/specs"] = specs(many)
    found[f"layer_{name}/codebook_difference"] = max(
        float(np.max(np.abs(np.asarray(a.codebook) - np.asarray(b.codebook))))
        for a, b in zip(jax.tree.leaves(one, is_leaf=gkq.is_clustered),
                        jax.tree.leaves(many, is_leaf=gkq.is_clustered)))
    found[f"layer_{name}/indices_differing"] = sum(
        int(np.sum(np.asarray(a.indices) != np.asarray(b.indices)))
        for a, b in zip(jax.tree.leaves(one, is_leaf=gkq.is_clustered),
                        jax.tree.leaves(many, is_leaf=gkq.is_clustered)))
    # q's layers hold 128 values each: the exact DP over them, as on one device.
    found[f"layer_{name}/small_layers_equal"] = equal(one["q"], many["q"])
    quantize_lib = sys.modules["gkq_jax.quantize"]
    run = quantize_lib._shard_local_clusterer(
        sp["mlp"]["kernel"].sharding, (96, 64), 8, (), None, gkq.LeafAxes(), True, "layer")
    found[f"layer_{name}/gathers"] = gathers(run, jax.random.PRNGKey(0), sp["mlp"]["kernel"],
                                             si["mlp"]["kernel"])
  # A layer of at most K distinct values gets them exactly, gathered from every device.
  few = jnp.asarray(rng.choice([-0.5, 0.25, 0.3, 1.0], (96, 64)), jnp.float32)
  q = gkq.quantize({"w": jax.device_put(few, NamedSharding(mesh, P(None, "model")))}, None,
                   [gkq.bits_rule("w", 3)])
  found["layer_lossless"] = bool(np.array_equal(np.asarray(gkq.dequantize(q)["w"]), few))
  return found


def _error(fn) -> str:
  """The message of the ValueError ``fn`` raises ('' when it raises none)."""
  try:
    fn()
  except ValueError as e:
    return str(e)
  return ""


def bad_input() -> dict:
  """What quantize says of shardings it cannot follow."""
  rules = [gkq.bits_rule("w", 3)]
  rows = jax.device_put(PARAMS["mlp"]["kernel"], NamedSharding(mesh, P("model", None)))
  split = jax.device_put(PARAMS["mlp"]["kernel"], NamedSharding(mesh, P(None, "model")))
  found = {
      # jax.device_put refuses such an array; a sharding given by hand can still say it.
      "uneven_error": _error(lambda: sharding_lib.channel_split(
          "w", (96, 66), NamedSharding(mesh, P(None, "model")), 0, 1)),
      "rows_error": _error(lambda: gkq.quantize({"w": rows}, None, rules,
                                                granularity="channel")),
      "model_error": _error(lambda: gkq.quantize({"w": split}, None, rules,
                                                 granularity="model")),
      "layer_init_error": _error(lambda: gkq.quantize({"w": split}, None, rules,
                                                      init="kmeans++")),
      "layer_l1_error": _error(lambda: gkq.quantize({"w": split}, None, rules, objective="l1")),
      "budget_error": _error(lambda: gkq.quantize({"w": split}, None, rules, budget_bytes=3000)),
  }
  import warnings
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    q = gkq.quantize({"w": split}, {"w": jnp.abs(PARAMS["mlp"]["kernel"])}, rules,
                     granularity="channel")
  found["resharded_warning"] = " ".join(str(c.message) for c in caught)
  found["resharded_spec"] = str(q["w"].indices.sharding.spec)
  return found


if __name__ == "__main__":
  sys.exit(main())
