"""OBD pruning, byte budgets and the equal-bytes study through the job (tiny data)."""

import json

import numpy as np
import pytest

import gkq_jax as gkq
from gkq_jax.job import run as run_lib
from tests.job.tiny import budget_config

BUDGET = 9000


def _config(**overrides):
  return budget_config(BUDGET, **overrides)


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("budget")
  return workdir, run_lib.run(_config(), workdir)


def test_obd_then_budget_gives_a_file_within_budget(budget_run):
  workdir, results = budget_run
  assert results["compressed_bytes"] == (workdir / "model.gkq").stat().st_size <= BUDGET
  assert results["compressed_bytes"] > 0.95 * BUDGET  # the budget is used, not wasted
  assert [c["path"] for c in results["allocation"]] == [
      "Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]
  loaded = gkq.load(workdir / "model.gkq")
  for _, leaf in gkq.clustered_leaves(loaded["params"]):
    # OBD removed exactly 75% of every layer; ECSQ may add zeros, never remove them.
    assert leaf.pinned_zero and np.mean(np.asarray(leaf.indices) == 0) >= 0.75 - 1e-3
  assert "validation_accuracy" in json.loads((workdir / "results.json").read_text())


def test_equal_bytes_mode_keeps_every_method_within_the_budget(budget_run, tmp_path):
  workdir, _ = budget_run
  c = _config(prune__enabled=False, equal_bytes__bits=(2,), equal_bytes__finetune_epochs=0,
              equal_bytes__methods=("kmeans", "ecsq grad_sq damped", "optimal allocation damped"))
  c.mode = "equal_bytes"
  c.init_checkpoint = str(workdir / "checkpoints" / "baseline")
  rows = run_lib.run(c, tmp_path)["equal_bytes"]
  assert [r["method"] for r in rows] == ["kmeans", "ecsq grad_sq damped 1",
                                         "optimal allocation damped 1"]
  for r in rows:
    assert 0.9 * r["budget_bytes"] <= r["bytes"] <= r["budget_bytes"], r
  # The damped allocation's candidates include damped ECSQ's one price for all.
  assert rows[2]["damped_distortion"] <= rows[1]["damped_distortion"] * (1 + 1e-6)
  assert (tmp_path / "equal_bytes.md").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(prune__sparsity=1.0), "sparsity must be in"),
    (dict(prune__method="random"), "prune.method"),
    (dict(quantize__budget_bytes=-1), "budget_bytes must be >= 0"),
    (dict(quantize__budget_methods=("kmeans", "magic")), "budget_methods"),
    (dict(quantize__damping=-1.0), "damping must be"),
])
def test_bad_settings_fail_before_training(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    run_lib.run(_config(**overrides), tmp_path)


def test_unknown_equal_bytes_method_is_named_before_any_work():

  c = _config(equal_bytes__methods=("kmeans", "kmeens"))
  with pytest.raises(ValueError, match=r"equal_bytes.methods \['kmeens'\]"):
    run_lib.check_config(c)  # before the data loads or anything trains
