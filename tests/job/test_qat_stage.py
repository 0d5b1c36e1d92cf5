"""The qat stage: training through the codebooks within a byte budget (tiny data)."""

import numpy as np
import pytest

import gkq_jax as gkq
from gkq_jax.job import run as run_lib
from tests.job.tiny import budget_config, kill_stage_after_one_epoch

BUDGET = 9000


def _config(**overrides):
  return budget_config(BUDGET, **{"qat__enabled": True, "qat__epochs": 2, "qat__distill": 1.0,
                                  **overrides})


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("qat")
  return workdir, run_lib.run(_config(), workdir)


def test_qat_keeps_the_file_within_budget_and_the_pruned_weights_at_zero(qat_run):
  workdir, results = qat_run
  assert results["compressed_bytes"] == (workdir / "model.gkq").stat().st_size <= BUDGET
  assert set(results["accuracy"]) >= {"pruned", "quantized", "qat", "finetuned"}
  assert all((workdir / "checkpoints" / f"qat_{e}").is_dir() for e in (1, 2))
  for _, leaf in gkq.clustered_leaves(gkq.load(workdir / "model.gkq")["params"]):
    assert leaf.pinned_zero and np.mean(np.asarray(leaf.indices) == 0) >= 0.75 - 1e-3


def test_killed_qat_stage_resumes_to_the_same_file(qat_run, tmp_path, monkeypatch):
  workdir, results = qat_run
  c = _config()
  c.init_checkpoint = str(workdir / "checkpoints" / "baseline")
  kill_stage_after_one_epoch(monkeypatch, "qat_1")
  with pytest.raises(KeyboardInterrupt):
    run_lib.run(c, tmp_path)
  again = run_lib.run(c, tmp_path)
  assert again["accuracy"] == results["accuracy"]
  assert (tmp_path / "model.gkq").read_bytes() == (workdir / "model.gkq").read_bytes()


@pytest.mark.parametrize("overrides, message", [
    (dict(qat__epochs=-1), "qat.epochs must be an integer >= 0"),
    (dict(qat__learning_rate=0.0), "qat.learning_rate must be > 0"),
    (dict(quantize__granularity="row", quantize__budget_bytes=0, prune__enabled=False),
     "qat re-assigns scalar weights"),
])
def test_bad_qat_settings_fail_before_training(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    run_lib.run(_config(**overrides), tmp_path)
