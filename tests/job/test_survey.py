"""The survey mode and its model glue (gkq_jax.job.survey, measure, layers)."""

import json
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gkq_jax as gkq
from configs import mlp as mlp_config
from configs import resnet34 as resnet_config
from gkq_jax.job import context, models
from gkq_jax.job import run as run_lib
from gkq_jax.job.models import surgery
from gkq_jax.job.modes import survey as survey_lib
from gkq_jax.job.training import measure

MLP_METHODS = ("baseline", "prune_datafree", "binary", "distill", "lowrank+gkq_2bit")
# Rows written when the survey released its compiled programs, by killed_then_resumed.
RELEASES: list[int] = []


def mlp_survey_config(**survey):
  c = mlp_config.get_config("smoke")
  c.mode, c.validation_size, c.log_every = "survey", 200, 100
  c.mlp.hidden = (48, 24)
  c.survey.methods = MLP_METHODS
  c.survey.epochs = 1
  c.survey.lowrank_layers = "^Dense_0$"
  c.survey.student.hidden = (12,)
  c.survey.student_epochs = 1
  c.survey.latency_batches = (16,)
  c.survey.latency_repeats = 2
  for k, v in survey.items():
    setattr(c.survey, k, v)
  return c


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory):
  """A survey killed in its third method, then rerun: (workdir, results, calls, rows)."""
  workdir = tmp_path_factory.mktemp("survey")
  calls, real = [], survey_lib.Survey.run_method

  def run_method(self, name):
    calls.append(name)
    if name == "binary" and calls.count(name) == 1:
      raise KeyboardInterrupt("simulated kill")
    return real(self, name)

  release = context.release_compiled

  def recorded():
    RELEASES.append(len(list((workdir / "survey").glob("*.json"))))
    release()

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(survey_lib.Survey, "run_method", run_method)
    mp.setattr(context, "release_compiled", recorded)
    with pytest.raises(KeyboardInterrupt):
      run_lib.run(mlp_survey_config(), workdir)
    first_rows = {p.stem: json.loads(p.read_text()) for p in (workdir / "survey").glob("*.json")}
    results = run_lib.run(mlp_survey_config(), workdir)
  return workdir, results, calls, first_rows


def test_survey_rows_files_and_plots(killed_then_resumed):
  workdir, results, _, _ = killed_then_resumed
  rows = {r["method"]: r for r in results["survey"]}
  assert list(rows) == list(MLP_METHODS)
  for name, r in rows.items():
    assert r["file_bytes"] == (workdir / "survey" / f"{survey_lib._file_name(name)}.gkq"
                               ).stat().st_size
    assert set(r["latency_ms"]) == {"16"} and r["latency_ms"]["16"] > 0
    assert r["energy"]["total_uj"] > 0 and 0 <= r["test_accuracy"] <= 1
    assert r["validation_accuracy"] is not None
  base = rows["baseline"]
  assert base["parameters"] == 64 * 48 + 48 + 48 * 24 + 24 + 24 * 10 + 10
  assert base["macs"] == 64 * 48 + 48 * 24 + 24 * 10
  assert base["test_accuracy"] == pytest.approx(results["accuracy"]["baseline"])
  # Structured pruning halves every hidden layer: smaller arrays, fewer MACs.
  pruned = rows["prune_datafree"]
  assert pruned["architecture"] == {"hidden": [24, 12]}
  assert pruned["macs"] == 64 * 24 + 24 * 12 + 12 * 10
  # A binary model: same MACs, far fewer bytes; a student is smaller.
  assert rows["binary"]["file_bytes"] < base["file_bytes"] / 10
  assert rows["binary"]["macs"] == base["macs"]
  assert rows["distill"]["parameters"] < base["parameters"] / 3
  combo = rows["lowrank+gkq_2bit"]
  assert combo["architecture"]["ranks"][0][0] == "Dense_0"
  assert combo["file_bytes"] < base["file_bytes"] / 8
  assert any(r["pareto_bytes"] for r in rows.values())
  text = (workdir / "survey.md").read_text()
  assert "| binary |" in text and "Pareto front" in text
  assert len(json.loads((workdir / "survey.json").read_text())["rows"]) == len(MLP_METHODS)
  for plot in ("survey_bytes.png", "survey_latency.png"):
    assert (workdir / plot).stat().st_size > 0


def test_killed_survey_resumes_without_redoing_finished_methods(killed_then_resumed):
  _, results, calls, first_rows = killed_then_resumed
  # Killed in "binary": the two methods before it ran once and were read back after.
  # (The combination asks for its base, lowrank, itself.)
  assert calls == ["baseline", "prune_datafree", "binary", "binary", "distill",
                   "lowrank+gkq_2bit", "lowrank"]
  assert set(first_rows) == {"baseline", "prune_datafree"}
  for r in results["survey"]:
    if r["method"] in first_rows:
      assert r["test_accuracy"] == first_rows[r["method"]]["test_accuracy"]


def test_compiled_programs_are_released_after_every_method(killed_then_resumed):
  # Issue 25: one process running many methods kept every compiled program (and its memory
  # mappings). Killed in the third method: after baseline and prune_datafree; resumed: after
  # each of the five rows (the first two read back) and after the latency measurements.
  assert RELEASES == [1, 2, 2, 2, 3, 4, 5, 5]


def test_stored_files_decode_to_quantized_values(killed_then_resumed):
  workdir, _, _, _ = killed_then_resumed
  binary = gkq.load(workdir / "survey" / "binary.gkq")["params"]
  for path, leaf in gkq.clustered_leaves(binary):
    values = np.unique(np.asarray(leaf.dequantize()))
    assert len(values) == 2 and values[0] == -values[1], path


def random_variables(model, x):
  """Random variables of the model's shapes, without compiling its init (slow for a ResNet);
  BatchNorm variances positive, residual branches non-zero."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(2)  # numpy: jax.random would compile a kernel per shape
  variables = jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape, np.float32), shapes)
  return jax.tree_util.tree_map_with_path(
      lambda p, v: np.abs(v) + 0.5 if gkq.path_string(p).endswith(("var", "scale")) else v,
      variables)


def _zero_removed(variables, group, removed):
  """The removed channels' outputs forced to zero in the unpruned model."""
  v = jax.tree.map(lambda x: x, variables)
  for path in group.norms or group.producers:
    node = v["params"]
    for key in path.split("/"):
      node = node[key]
    for name in (("scale", "bias") if group.norms else ("kernel", "bias")):
      if name in node:
        node[name] = jnp.asarray(node[name]).at[..., removed].set(0)
  return v


@pytest.mark.parametrize("model,shape", [
    (models.LeNet5(), (2, 28, 28, 1)),
    (models.ResNetTiny(), (2, 4, 4, 3)),
    (models.WideResNet(depth=10, widen=1, dropout=0.0), (2, 4, 4, 3)),
])
def test_filter_pruning_equals_zeroed_channels_with_smaller_arrays(model, shape):
  x = np.random.default_rng(1).standard_normal(shape, np.float32)
  variables = random_variables(model, x)
  zeroed, pruned, narrow = variables, variables, model
  for group, kind, narrower in surgery.channel_groups(model):
    n = gkq.num_channels(variables, group)
    keep = gkq.keep_largest(gkq.filter_norms(variables, group, 1 if kind == "conv" else 2),
                            n // 2)
    zeroed = _zero_removed(zeroed, group, np.setdiff1d(np.arange(n), keep))
    pruned = gkq.keep_channels(pruned, group, keep)
    narrow = narrower(narrow, n // 2)
  apply = jax.jit(model.apply)
  expected = apply(zeroed, x)
  np.testing.assert_allclose(jax.jit(narrow.apply)(pruned, x), expected, rtol=1e-4, atol=1e-4)
  shapes = lambda t: jax.tree.map(jnp.shape, t)
  assert shapes(pruned) == shapes(jax.eval_shape(narrow.init, jax.random.PRNGKey(0), x))
  full, small = (sum(np.size(a) for a in jax.tree.leaves(v)) for v in (variables, pruned))
  assert small < 0.7 * full
  assert not np.allclose(apply(variables, x), expected, atol=1e-3)  # pruning did something


def test_block_removal_keeps_shapes_consistent():
  model = models.ResNetTiny().clone(stage_sizes=(2, 1))
  x = np.random.default_rng(1).standard_normal((2, 4, 4, 3), np.float32)
  variables = random_variables(model, x)
  assert surgery.removable_blocks(model) == [0, 1]
  shorter = model.clone(removed_blocks=(0, 1))
  kept = gkq.remove_layers(variables, ["BasicBlock_0", "BasicBlock_1"])
  shapes = lambda t: jax.tree.map(jnp.shape, t)
  assert shapes(kept) == shapes(jax.eval_shape(shorter.init, jax.random.PRNGKey(0), x))
  # A block whose residual branch outputs zero is an identity: removing it changes nothing.
  quiet = jax.tree.map(lambda a: a, variables)
  norm = quiet["params"]["BasicBlock_1"]["BatchNorm_1"]
  norm["scale"], norm["bias"] = norm["scale"] * 0, norm["bias"] * 0
  without = jax.jit(model.clone(removed_blocks=(1,)).apply)(
      gkq.remove_layers(variables, ["BasicBlock_1"]), x)
  np.testing.assert_allclose(without, jax.jit(model.apply)(quiet, x), rtol=1e-5, atol=1e-5)
  assert not np.allclose(without, jax.jit(model.apply)(variables, x), atol=1e-3)
  with pytest.raises(ValueError, match="only identity blocks"):
    jax.eval_shape(model.clone(removed_blocks=(2,)).init, jax.random.PRNGKey(0), x)


def test_qat_folds_each_resnet_conv_with_its_batchnorm():
  model = models.ResNetTiny()
  variables = random_variables(model, np.zeros((1, 4, 4, 3), np.float32))
  folds = surgery.fold_scales(model, variables)
  # stem, two convs per block, and block 1's shortcut (block 0 keeps its width: no shortcut).
  assert set(folds) == {"stem/kernel", "BasicBlock_0/Conv_0/kernel", "BasicBlock_0/Conv_1/kernel",
                        "BasicBlock_1/Conv_0/kernel", "BasicBlock_1/Conv_1/kernel",
                        "BasicBlock_1/shortcut/kernel"}
  norm, stats = variables["params"]["BasicBlock_1"], variables["batch_stats"]["BasicBlock_1"]
  np.testing.assert_allclose(folds["BasicBlock_1/shortcut/kernel"], norm["shortcut_norm"]["scale"]
                             / np.sqrt(stats["shortcut_norm"]["var"] + 1e-5), rtol=1e-6)
  assert surgery.fold_scales(models.MLP(), {"params": {}}) == {}


def test_macs_counted_from_the_model_match_hand_counts():
  lenet = models.LeNet5()
  v = jax.eval_shape(lambda: lenet.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1))))
  conv0, conv1 = 24 * 24 * 20 * 25, 8 * 8 * 50 * 25 * 20
  assert measure.count_macs(lenet, v, (28, 28, 1)) == conv0 + conv1 + 800 * 500 + 500 * 10
  factored = lenet.clone(ranks=(("Conv_1", 5), ("Dense_0", 40)), conv_widths=(10, 25))
  v = jax.eval_shape(lambda: factored.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1))))
  assert measure.count_macs(factored, v, (28, 28, 1)) == (
      24 * 24 * 10 * 25 + 8 * 8 * 5 * 25 * 10 + 8 * 8 * 25 * 5 + 400 * 40 + 40 * 500 + 5000)
  mlp = models.MLP()
  v = jax.eval_shape(lambda: mlp.init(jax.random.PRNGKey(0), jnp.zeros((1, 784))))
  assert measure.count_macs(mlp, v, (784,)) == 784 * 300 + 300 * 100 + 100 * 10


def test_pareto_front():
  rows = [{"test_accuracy": a, "file_bytes": b} for a, b in
          [(0.9, 100), (0.8, 10), (0.85, 50), (0.84, 60), (0.9, 200), (0.7, 10)]]
  assert survey_lib.pareto_front(rows, lambda r: r["file_bytes"]) == [
      True, True, True, False, False, False]


def test_resnet_smoke_survey_with_block_removal(tmp_path):
  c = resnet_config.get_config("smoke")
  c.mode, c.validation_size, c.log_every = "survey", 200, 100
  c.num_epochs = 0  # compile time dominates: the ResNet path, not its training, is tested
  c.survey.methods = ("baseline", "remove_blocks")
  c.survey.epochs = 0
  c.survey.remove_blocks = 1
  c.survey.latency_batches = (1,)
  c.survey.latency_repeats = 2
  results = run_lib.run(c, tmp_path)
  rows = {r["method"]: r for r in results["survey"]}
  assert rows["remove_blocks"]["architecture"] == {"removed_blocks": [0]}
  assert rows["remove_blocks"]["parameters"] < rows["baseline"]["parameters"]
  assert set(rows["remove_blocks"]["info"]["validation_drop_per_block"]) == {"0"}
  loaded = gkq.load(tmp_path / "survey" / "remove_blocks.gkq")
  assert "BasicBlock_0" not in loaded["params"] and "BasicBlock_0" not in loaded["batch_stats"]


def _runner(config, has_validation=True):
  """A Survey over a fake context: the checks run before any data or training."""
  data = types.SimpleNamespace(num_classes=10, sample_shape=(8, 8, 1),
                               has_validation=has_validation)
  ctx = types.SimpleNamespace(config=config, data=data, workdir=pathlib.Path("unused"))
  model = models.create_model(config, 10)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
  return survey_lib.Survey(ctx, types.SimpleNamespace(params=params, batch_stats=None))


def test_bad_survey_input():
  def check(**survey):
    config = mlp_survey_config(**survey)
    run_lib.check_model(config, models.create_model(config, 10), (8, 8, 1))

  with pytest.raises(ValueError, match="not fewer than the teacher's"):
    check(methods=("distill",), student={"hidden": (64, 32)})
  with pytest.raises(ValueError, match=r"survey.student \{'hidden': \(24, 12\), 'width': 3\}.*"
                                       "unexpected keyword argument 'width'"):
    check(methods=("distill",), student={"width": 3})
  with pytest.raises(ValueError, match="unknown survey method 'svd'"):
    check(methods=("baseline", "svd"))
  with pytest.raises(ValueError, match="bits must be in 1..16"):
    check(methods=("qat_17bit",))
  with pytest.raises(ValueError, match="a combination is"):
    check(methods=("qat_4bit+gkq_4bit",))
  with pytest.raises(ValueError, match="needs a ResNet"):
    check(methods=("remove_blocks",))
  with pytest.raises(ValueError, match="twice"):
    check(methods=("binary", "binary"))
  with pytest.raises(ValueError, match="prune_fraction=1.0"):
    _runner(mlp_survey_config(prune_fraction=1.0)).prune("prune_norm")
  with pytest.raises(ValueError, match="--config.validation_size"):
    _runner(mlp_survey_config(learning_rates=(1e-3, 1e-4)), has_validation=False).tune(
        "x", None, None, epochs=1, tx_for=None)
  resnet = resnet_config.get_config("smoke")
  resnet.survey.remove_blocks = 2  # ResNetTiny has one removable block
  with pytest.raises(ValueError, match="remove_blocks=2"):
    _runner(resnet).remove_blocks("remove_blocks")
