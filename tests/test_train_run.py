import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import lenet5 as lenet5_config
from configs import mlp as mlp_config
from configs import resnet34 as resnet34_config
from gkq_jax import data as data_lib
from gkq_jax import run as run_lib
from gkq_jax import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def smoke(module=mlp_config, **overrides):
  config = module.get_config("smoke")
  config.log_every = 5
  config.mode = "train"
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def test_full_run_on_digits_learns(tmp_path):
  results = run_lib.run(smoke(num_epochs=3), tmp_path)
  assert results["accuracy"]["baseline"] > 0.8  # chance is 0.1
  assert json.loads((tmp_path / "results.json").read_text()) == results
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["epoch"] for l in lines] == [1, 2, 3]


def test_resnet_and_lenet_smoke_runs(tmp_path):
  for module in (resnet34_config, lenet5_config):
    config = smoke(module, augment=True, cutout=4, label_smoothing=0.1)
    config.resnet.dtype = "bfloat16"  # mixed precision; LeNet-5 ignores it
    results = run_lib.run(config, tmp_path / module.__name__)
    assert 0.0 <= results["accuracy"]["baseline"] <= 1.0


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
  monkeypatch.setattr(data_lib, "train_batches", real_batches)
  resumed = run_lib.run(config, tmp_path / "resumed")
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


SCRIPT = """
import jax, numpy as np
from configs import mlp
from gkq_jax import data as data_lib, run as run_lib, train as train_lib
config = mlp.get_config("smoke"); config.batch_size = 32
ds = data_lib.load("digits")
model = run_lib.create_model(config, 10)
tx = train_lib.create_optimizer(config, 40, 1)
state = train_lib.init_state(model, ds.train_x, tx, 0)
mesh = train_lib.Mesh1D()
state = mesh.replicate(state)
step = jax.jit(train_lib.train_step)
losses = []
for i, batch in enumerate(data_lib.train_batches(ds, 32, 0, 0)):
  state, m = step(state, mesh.put_batch(batch), jax.random.PRNGKey(i))
  losses.append(float(m["loss"]))
  if i == 9: break
print(jax.device_count(), repr(losses))
"""


def test_data_parallel_over_four_devices_matches_one():
  outs = {}
  for n in (1, 4):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, text=True,
                         capture_output=True, check=True)
    devices, losses = out.stdout.strip().split(" ", 1)
    assert int(devices) == n
    outs[n] = eval(losses)
  np.testing.assert_allclose(outs[4], outs[1], rtol=2e-4)


def test_main_cli_smoke_and_locked_config(tmp_path):
  cmd = [sys.executable, "main.py", "--config=configs/mlp.py:smoke", f"--workdir={tmp_path}"]
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
  assert (tmp_path / "results.json").exists()
  bad = subprocess.run(cmd + ["--config.num_epoch=3"], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode != 0 and "num_epoch" in bad.stderr
  bad = subprocess.run(cmd + ["--config.dataset=idx:/no/such/dir"], cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith("error: idx: directory /no/such/dir")
