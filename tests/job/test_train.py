"""The training loop: learning, resume, NaN guard, bad input (gkq_jax.job.train)."""

import json

import numpy as np
import pytest

from configs import lenet5 as lenet5_config
from configs import mlp as mlp_config
from configs import resnet34 as resnet34_config
from gkq_jax.job import run as run_lib
from gkq_jax.job.data import images as data_lib
from gkq_jax.job.training import train as train_lib
from tests.job.tiny import smoke


def test_full_run_on_digits_learns(tmp_path):
  results = run_lib.run(smoke(num_epochs=3, validation_size=200), tmp_path)
  assert results["accuracy"]["baseline"] > 0.8  # chance is 0.1
  assert results["validation_accuracy"]["baseline"] > 0.8
  assert json.loads((tmp_path / "results.json").read_text()) == results
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["epoch"] for l in lines] == [1, 2, 3]


def test_resnet_and_lenet_smoke_runs(tmp_path):
  # One epoch each; chance is 0.1. Random crops with 4 pixels of padding (and
  # flips) wreck 8x8 digits, so ResNet (12% with them, 27% without) runs plain;
  # LeNet-5 sees the digits resized to 28x28 and takes the augmentation.
  augmented = dict(augment=True, cutout=4, label_smoothing=0.1)
  for module, overrides, floor in ((resnet34_config, {}, 0.2), (lenet5_config, augmented, 0.6)):
    config = smoke(module, **overrides)
    config.resnet.dtype = "bfloat16"  # mixed precision; LeNet-5 ignores it
    results = run_lib.run(config, tmp_path / module.__name__)
    assert results["accuracy"]["baseline"] > floor, module.__name__


def test_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
  # Augmentation draws from the step's key, so a resumed run sees the same images.
  config = smoke(num_epochs=3, augment=True, cutout=2, label_smoothing=0.1)
  straight = run_lib.run(config, tmp_path / "straight")

  real_batches = data_lib.train_batches

  def dies_in_epoch_two(ds, batch_size, seed, epoch, *args, **kwargs):
    if epoch == 1:
      raise KeyboardInterrupt("simulated kill")
    return real_batches(ds, batch_size, seed, epoch, *args, **kwargs)

  monkeypatch.setattr(data_lib, "train_batches", dies_in_epoch_two)
  with pytest.raises(KeyboardInterrupt):
    run_lib.run(config, tmp_path / "resumed")
  epochs_trained = []

  def counted(ds, batch_size, seed, epoch, *args, **kwargs):
    epochs_trained.append(epoch)
    return real_batches(ds, batch_size, seed, epoch, *args, **kwargs)

  monkeypatch.setattr(data_lib, "train_batches", counted)
  resumed = run_lib.run(config, tmp_path / "resumed")
  # The rerun trains only what the kill left: epoch 1 comes from its checkpoint.
  assert epochs_trained == [1, 2]
  lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3]
  assert resumed["accuracy"]["baseline"] == pytest.approx(
      straight["accuracy"]["baseline"], abs=1e-6)
  assert resumed["baseline_test_loss"] == pytest.approx(straight["baseline_test_loss"], rel=1e-5)


def test_label_smoothing_loss():
  logits = np.asarray([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], np.float32)
  labels = np.asarray([0, 2])
  plain = train_lib.cross_entropy(logits, labels)
  assert float(train_lib.cross_entropy(logits, labels, 0.0)) == float(plain)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = 0.9 * np.eye(3)[labels] + 0.1 / 3
  expected = -(targets * log_p).sum(-1).mean()
  np.testing.assert_allclose(train_lib.cross_entropy(logits, labels, 0.1), expected, rtol=1e-6)


def test_nan_guard_names_the_step(tmp_path):
  with pytest.raises(train_lib.NonFiniteLossError, match=r"at step \d+"):
    run_lib.run(smoke(learning_rate=1e9, optimizer="sgd", warmup_epochs=0.0), tmp_path)


def test_bad_inputs_give_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="larger than the 1438 training examples"):
    run_lib.run(smoke(batch_size=5000), tmp_path / "a")
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ValueError, match="cannot be written"):
    run_lib.run(smoke(), blocker / "sub")
  with pytest.raises(ValueError, match="unknown variant"):
    mlp_config.get_config("fashion")
  config = smoke(resnet34_config)
  config.resnet.dtype = "float16"
  with pytest.raises(ValueError, match="'float32' or 'bfloat16'"):
    run_lib.run(config, tmp_path / "b")
