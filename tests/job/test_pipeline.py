"""The compression pipeline end to end on tiny data (gkq_jax.job.pipeline)."""

import collections
import json
import types

import jax
import numpy as np
import pytest

import gkq_jax as gkq
from configs import mlp as mlp_config
from gkq_jax.job import context, models
from gkq_jax.job import report as report_lib
from gkq_jax.job import run as run_lib
from gkq_jax.job.modes import compress as pipeline
from gkq_jax.job.training import train as train_lib
from tests.job.tiny import kill_stage_after_one_epoch, pipeline_config


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


def count_steps(monkeypatch) -> collections.Counter:
  """Training steps each stage actually runs from now on, by stage name."""
  steps = collections.Counter()
  real_fit = train_lib.fit

  def fit(state, data, step, **kw):
    def counted(*args):
      steps[kw["stage"]] += 1
      return step(*args)

    return real_fit(state, data, counted, **kw)

  monkeypatch.setattr(train_lib, "fit", fit)
  return steps


def test_rerun_replays_checkpoints_to_the_same_result(finished_run, monkeypatch):
  workdir, results = finished_run
  steps = count_steps(monkeypatch)
  again = run_lib.run(pipeline_config(), workdir)
  assert not steps  # every stage comes back from its checkpoints, none retrains
  assert again["accuracy"] == results["accuracy"]
  assert again["compressed_bytes"] == results["compressed_bytes"]


def test_interrupted_finetune_resumes(tmp_path, monkeypatch):
  config = pipeline_config()
  config.prune.enabled = False
  config.finetune.epochs = 2
  straight = run_lib.run(config, tmp_path / "straight")
  kill_stage_after_one_epoch(monkeypatch, "finetune")
  with pytest.raises(KeyboardInterrupt):
    run_lib.run(config, tmp_path / "resumed")
  assert (tmp_path / "resumed" / "checkpoints" / "finetune").exists()
  steps = count_steps(monkeypatch)
  resumed = run_lib.run(config, tmp_path / "resumed")
  # Only fine-tuning's second epoch is left; the baseline comes from its checkpoint.
  assert steps == {"finetune": 1438 // config.batch_size}
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


def test_tiny_run_stays_near_its_baseline(finished_run):
  # The README's accuracy claims, scaled down: LeNet-300-100 on the digits,
  # pruned to ~22% kept in two rounds, 3-bit codebooks, one epoch of fine-tuning.
  # Measured: baseline 96.4%, pruned 97.2%, quantized 96.9%, fine-tuned 97.2%.
  acc = finished_run[1]["accuracy"]
  assert acc["baseline"] > 0.9
  assert acc["quantized"] >= acc["pruned"] - 0.02  # clustering alone costs < 2 points
  assert acc["finetuned"] >= acc["baseline"] - 0.01  # the end result within 1 point


def test_finetune_stage_distils_and_sums_cluster_updates(finished_run, tmp_path):
  # One epoch of fine-tuning from the fixture's baseline per setting: each knob
  # must change what the stage does (a knob that is a no-op leaves it identical).
  workdir, _ = finished_run
  config = pipeline_config()
  data = run_lib.load_data(config)
  ctx = context.Context(config, data, train_lib.Mesh1D(), report_lib.MetricWriter(tmp_path),
                         tmp_path)
  state = train_lib.init_state(models.create_model(config, data.num_classes), data.sample_shape,
                               ctx.optimizer(1, 0.01), config.seed)
  state = run_lib.restore_init_checkpoint(str(workdir / "checkpoints" / "baseline"), state)
  teacher = {"params": state.params, "batch_stats": state.batch_stats}
  q = pipeline.quantize_stage(ctx, state, context.cluster_rules(config), None).params
  start = jax.tree.leaves(gkq.dequantize(q))

  def moves(reduce, distill):
    config.finetune.reduce, config.finetune.distill = reduce, distill
    tuned, _ = pipeline.finetune_stage(ctx, state, q, None, teacher, stage=f"{reduce}{distill}",
                                       epochs=1)
    return np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(tuned.params), start)])

  mean, total, alone = moves("mean", 0.5), moves("sum", 0.5), moves("mean", 0.0)
  # "sum" adds up the updates of a cluster: hundreds of weights each here.
  assert np.abs(total).mean() > 10 * np.abs(mean).mean()
  assert np.abs(mean - alone).max() > 0.01 * np.abs(mean).max()  # the teacher's pull


def test_quantize_stage_passes_group_size_per_grouped_channel(monkeypatch):
  config = mlp_config.get_config("smoke")
  config.quantize.granularity, config.quantize.group_size = "channel", 4
  monkeypatch.setattr(context, "importance_of", lambda ctx, state, kind: None)
  kernel = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
  ctx = types.SimpleNamespace(config=config)
  state = types.SimpleNamespace(params={"dense": {"kernel": kernel}})
  q = pipeline.quantize_stage(ctx, state, context.cluster_rules(config), None).params
  # (fan_in / group_size, channels, K): two codebooks per output channel.
  assert q["dense"]["kernel"].codebook.shape[:2] == (2, 3)
