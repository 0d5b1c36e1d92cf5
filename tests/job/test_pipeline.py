"""The compression pipeline end to end on tiny data (gkq_jax.job.pipeline)."""

import json

import numpy as np
import pytest

import gkq_jax as gkq
from configs import mlp as mlp_config
from gkq_jax.job import run as run_lib
from tests.job.tiny import pipeline_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pipeline")
  return workdir, run_lib.run(pipeline_config(), workdir)


def test_pipeline_report_file_and_stages(finished_run):
  workdir, results = finished_run
  report = json.loads((workdir / "report.json").read_text())
  for key in ("fp32_bytes", "compressed_bytes", "compression_ratio", "accuracy", "layers"):
    assert key in report
  assert set(report["accuracy"]) == {"baseline", "pruned", "quantized", "finetuned",
                                     "compressed_file"}
  assert report["compressed_bytes"] == (workdir / "model.gkq").stat().st_size
  assert report["compression_ratio"] == pytest.approx(
      report["fp32_bytes"] / report["compressed_bytes"])
  assert report["compression_ratio"] > 10
  # Logits from the file are bit-identical, so the accuracy is the same.
  assert report["accuracy"]["compressed_file"] == report["accuracy"]["finetuned"]
  for layer in report["layers"]:
    assert layer["distinct_values"] <= layer["clusters"] == 8
    assert layer["kept_percent"] < 60
  for name in ("report.md", "weights.png", "stages.png"):
    assert (workdir / name).stat().st_size > 0


def test_report_has_energy_per_stage(finished_run):
  workdir, _ = finished_run
  report = json.loads((workdir / "report.json").read_text())
  stages = report["energy"]["stages"]
  assert list(stages) == ["baseline", "pruned", "compressed_file"]
  # LeNet-300-100 on 8x8 digits: 64*300 + 300*100 + 100*10 MACs per example.
  assert stages["baseline"]["dense_macs"] == 64 * 300 + 300 * 100 + 100 * 10
  totals = [stages[s]["total_uj"] for s in stages]
  assert totals[0] > totals[1] > totals[2] > 0  # zeros skipped, then 3-bit indices
  assert stages["pruned"]["macs"] < stages["baseline"]["macs"]
  assert stages["compressed_file"]["mac_uj"] < stages["pruned"]["mac_uj"]  # int8 MACs
  assert "energy per example" in (workdir / "report.md").read_text()


def test_loaded_file_has_k_values_and_pruned_zeros(finished_run):
  workdir, _ = finished_run
  loaded = gkq.load(workdir / "model.gkq")
  dense = gkq.dequantize(loaded["params"])
  for path, leaf in gkq.clustered_leaves(loaded["params"]):
    values = np.asarray(leaf.dequantize())
    assert len(np.unique(values)) <= leaf.num_clusters
    assert leaf.pinned_zero and (values == 0).mean() > 0.4
  assert set(dense) == {"Dense_0", "Dense_1", "Dense_2"}


def test_rerun_replays_checkpoints_to_the_same_result(finished_run):
  workdir, results = finished_run
  again = run_lib.run(pipeline_config(), workdir)
  assert again["accuracy"] == results["accuracy"]
  assert again["compressed_bytes"] == results["compressed_bytes"]


def test_interrupted_finetune_resumes(tmp_path, monkeypatch):
  from gkq_jax.job import train as train_lib
  config = pipeline_config()
  config.prune.enabled = False
  config.finetune.epochs = 2
  straight = run_lib.run(config, tmp_path / "straight")
  real_fit = train_lib.fit
  calls = {"n": 0}

  def killed_in_finetune(state, data, step, **kw):
    if kw["stage"] == "finetune" and calls["n"] == 0:
      calls["n"] += 1
      kw["num_epochs"] = 1  # checkpoint epoch 1, then "die"
      real_fit(state, data, step, **kw)
      raise KeyboardInterrupt("simulated kill")
    return real_fit(state, data, step, **kw)

  monkeypatch.setattr(train_lib, "fit", killed_in_finetune)
  with pytest.raises(KeyboardInterrupt):
    run_lib.run(config, tmp_path / "resumed")
  assert (tmp_path / "resumed" / "checkpoints" / "finetune").exists()
  resumed = run_lib.run(config, tmp_path / "resumed")
  assert resumed["accuracy"] == straight["accuracy"]




def test_bad_compression_inputs(tmp_path):
  with pytest.raises(ValueError, match="matches no parameter"):
    run_lib.run(_with_rule("Cnov_0/kernel=4"), tmp_path / "a")
  with pytest.raises(ValueError, match="bits must be in 1..16"):
    run_lib.run(_with_bits(17), tmp_path / "b")
  other = mlp_config.get_config("smoke")
  other.mode = "train"
  other.mlp.hidden = (7,)
  run_lib.run(other, tmp_path / "other")
  config = pipeline_config()
  config.init_checkpoint = str(tmp_path / "other" / "checkpoints" / "baseline")
  with pytest.raises(ValueError, match="another model"):
    run_lib.run(config, tmp_path / "c")


def _with_rule(rule):
  c = pipeline_config()
  c.quantize.rules = (rule,)
  return c


def _with_bits(bits):
  c = pipeline_config()
  c.quantize.bits = bits
  return c






def test_distillation_and_sum_reduction_finetune(tmp_path):
  config = pipeline_config()
  config.prune.enabled = False
  config.finetune.distill = 0.5
  config.finetune.reduce = "sum"
  config.finetune.learning_rate = 1e-4
  config.quantize.granularity = "channel"
  results = run_lib.run(config, tmp_path)
  acc = results["accuracy"]
  assert acc["finetuned"] == acc["compressed_file"]
  assert acc["finetuned"] > 0.5
