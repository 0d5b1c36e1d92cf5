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
  for what in ("quantize", "dequantize", "step"):
    assert findings[f"{tag}/{what}_equal"], what  # bit for bit one device's result
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
