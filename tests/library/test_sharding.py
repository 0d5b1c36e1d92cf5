"""Compression keeps each weight's sharding (issue 23): on 4 simulated CPU devices,
per-channel clustering runs shard by shard and equals one device's bit for bit,
and dequantize, fine-tuning steps, refresh_codebooks, packing and importance
keep the weights sharded with no all-gather of weight-sized arrays.

The device count must be set before JAX starts, so the checks run in a fresh
process (tests/library/sharded_checks.py) that prints its findings as JSON.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def findings():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, str(HERE / "sharded_checks.py")], env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


CHANNEL_SPLIT = {"['mlp']['kernel']": "P(None, 'model')",
                 "['q']['kernel']": "P(None, 'model')"}  # (32, 8, 16): its heads axis


@pytest.mark.parametrize("tag", ["gsNone", "gs16"])
def test_per_channel_compression_stays_where_the_weights_lie(findings, tag):
  assert findings["devices"] == 4
  for what in ("quantize", "dequantize", "step", "requantize"):
    assert findings[f"{tag}/{what}_equal"], what  # bit for bit one device's result
  assert findings[f"{tag}/requantize_compiles"] == 0  # the shard-local program is reused
  books = "P('model',)" if tag == "gsNone" else "P(None, 'model')"
  specs = findings[f"{tag}/quantize_specs"]
  assert specs["['mlp']['kernel'].indices"] == "P(None, 'model')"
  assert specs["['q']['kernel'].indices"] == "P(None, 'model', None)"
  assert specs["['mlp']['kernel'].codebook"] == books
  assert findings[f"{tag}/dequantize_specs"] == CHANNEL_SPLIT
  assert findings[f"{tag}/step_specs"] == CHANNEL_SPLIT
  assert findings[f"{tag}/refresh_specs"]["['mlp']['kernel'].indices"] == "P(None, 'model')"
  for leaf in ("mlp", "q"):
    assert findings[f"{tag}/pack_specs"][f"['{leaf}']['kernel'].packed"] == "P(None, None, 'model')"
  for what in ("dequantize", "step", "refresh"):
    # No all-gather at all; above all none of a weight-sized operand.
    assert findings[f"{tag}/{what}_gathers"] == [], what


def test_importance_and_cluster_per_channel_follow_the_weights(findings):
  assert findings["importance_specs"] == {"['mlp']['kernel']": "P(None, 'model')"}
  # XLA's partitioned matmuls round a little differently from one device's.
  assert findings["importance_max_relative_difference"] < 1e-5
  assert findings["per_channel_equal"]
  assert findings["per_channel_specs"] == {".codebook": "P('model',)",
                                           ".indices": "P(None, 'model')"}


def test_channels_clustered_block_by_block_equal_one_device(findings):
  # Large shards are clustered a block of channels at a time (bounded memory);
  # forced on these small ones: 16 blocks of mlp's 16 channels, 2 of q's.
  assert findings["blocks"] == [16, 2]
  for tag in ("gsNone", "gs16"):
    assert findings[f"blocks_{tag}_equal"], tag
    assert findings[f"blocks_{tag}_specs"] == findings[f"{tag}/quantize_specs"]


@pytest.mark.parametrize("layout", ["split", "grid"])
def test_per_layer_codebooks_sum_histograms_across_devices(findings, layout):
  # Split along the channels on 4 devices, or along both axes of a 2 x 2 mesh:
  # the same codebooks as one device up to the order of float32 sums, the same
  # indices, which stay where their weights are.
  assert findings[f"layer_{layout}/codebook_difference"] < 1e-5
  assert findings[f"layer_{layout}/indices_differing"] == 0
  # Layers small enough for the exact DP are gathered and clustered whole: bit for bit.
  assert findings[f"layer_{layout}/small_layers_equal"]
  specs = findings[f"layer_{layout}/specs"]
  assert specs["['mlp']['kernel'].codebook"] == "P()"
  assert specs["['mlp']['kernel'].indices"] == ("P(None, 'model')" if layout == "split"
                                                else "P('data', 'model')")
  # Only the devices' distinct values of the lossless check cross (8 per device).
  assert all(size <= 4 * 8 * 4 for size in findings[f"layer_{layout}/gathers"])
  assert findings["layer_lossless"]


def test_shardings_it_cannot_follow_are_named(findings):
  assert "channel axis of 66 does not split evenly" in findings["uneven_error"]
  assert "along axes other than its output channels" in findings["rows_error"]
  assert "would gather it onto one device" in findings["model_error"]
  assert "init='kmeans++' draws its start from the values" in findings["layer_init_error"]
  assert "objective='l1' needs weighted medians" in findings["layer_l1_error"]
  assert "would gather it onto one device" in findings["budget_error"]
  assert "importance of w is not sharded like the weight" in findings["resharded_warning"]
  assert findings["resharded_spec"] == "P(None, 'model')"


def test_two_processes_compress_their_own_channels_and_write_them(tmp_path):
  port = str(21000 + os.getpid() % 20000)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, str(HERE / "two_process_checks.py"), str(i), port,
                             str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=240) for p in procs]
  finally:  # one process failing leaves the other waiting at a barrier
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:] + outs[1][1][-3000:]
  for out, _ in outs:
    host = json.loads(out.strip().splitlines()[-1])
    assert (host["processes"], host["devices"], host["local_channels"]) == (2, 2, [32])
    for check in ("indices", "codebook", "dequantize", "step", "file_indices", "file_codebook",
                  "orbax_indices", "layer_indices"):
      assert host[check] is True, check
    assert host["layer_codebook_difference"] < 1e-5
    assert host["step_spec"] == host["file_spec"] == host["orbax_spec"] == "P(None, 'model')"
  assert (tmp_path / "file" / "process-00000.gkq").exists()
  assert (tmp_path / "file" / "process-00001.gkq").exists()


def test_sharded_file_set_on_one_device_reads_back_whole(tmp_path):
  import jax.numpy as jnp
  import numpy as np

  import gkq_jax as gkq
  rng = np.random.default_rng(1)
  params = {"dense": {"kernel": jnp.asarray(rng.standard_normal((40, 12)), jnp.float32),
                      "bias": jnp.asarray(rng.standard_normal(12), jnp.float32)}}
  q = gkq.quantize(params, None, [gkq.bits_rule("kernel", 2)], granularity="channel")
  written = gkq.save_sharded(tmp_path / "set", q)
  assert written["shards"] == 2
  back = gkq.load_sharded(tmp_path / "set")
  np.testing.assert_array_equal(gkq.dequantize(back)["dense"]["kernel"],
                                gkq.dequantize(q)["dense"]["kernel"])
  np.testing.assert_array_equal(back["dense"]["bias"], params["dense"]["bias"])
  with pytest.raises(ValueError, match="written by save_sharded"):
    gkq.load_sharded(tmp_path)
  with pytest.raises(ValueError, match="does not hold"):
    gkq.load_sharded(tmp_path / "set", {"dense/nope": None})
