"""Streaming input through grain (gkq_jax.job.streaming): shards, resume, bad input."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import mlp as mlp_config
from configs import resnet34 as resnet34_config
from gkq_jax.job import run as run_lib
from gkq_jax.job.data import images as data_lib
from gkq_jax.job.data import streaming
from gkq_jax.job.training import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
N_TRAIN, N_TEST = 48, 12


def write_folder(root: pathlib.Path, size=8) -> pathlib.Path:
  """train/ and test/ class folders of PNGs whose first pixel holds the image's id."""
  rng = np.random.default_rng(0)
  for split, n, offset in (("train", N_TRAIN, 0), ("test", N_TEST, 100)):
    for i in range(n):
      folder = root / split / f"class{i % 3}"
      folder.mkdir(parents=True, exist_ok=True)
      pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
      pixels[0, 0, 0] = offset + i
      Image.fromarray(pixels).save(folder / f"{i:03d}.png")
  return root


def image_ids(ds, x):
  """Recovers the ids written by write_folder from normalised images."""
  first = x[:, 0, 0, 0] * ds.prepare.std[0] + ds.prepare.mean[0]
  return np.rint(first).astype(int).tolist()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_folder(tmp_path_factory.mktemp("images"))


def test_each_example_read_by_exactly_one_host_per_epoch(folder):
  ds = streaming.open_stream(f"folder:{folder}")
  assert (ds.num_train, ds.sample_shape, ds.num_classes) == (N_TRAIN, (8, 8, 3), 3)
  per_host = []
  for host in range(2):
    batches = list(ds.train_batches(8, seed=0, epoch=0, process_index=host, process_count=2))
    assert all(x.shape == (4, 8, 8, 3) and y.shape == (4,) for x, y in batches)
    per_host.append([i for x, _ in batches for i in image_ids(ds, x)])
  assert not set(per_host[0]) & set(per_host[1])
  assert sorted(per_host[0] + per_host[1]) == list(range(N_TRAIN))
  # The same shard in another order next epoch; the in-memory path shards the same way.
  again = [i for x, _ in ds.train_batches(8, 0, 1, process_index=0, process_count=2)
           for i in image_ids(ds, x)]
  assert sorted(again) == sorted(per_host[0]) and again != per_host[0]
  memory = data_lib.load(f"folder:{folder}")
  seen = [len(y) for h in range(2)
          for _, y in data_lib.train_batches(memory, 8, 0, 0, process_index=h, process_count=2)]
  assert sum(seen) == N_TRAIN - N_TRAIN % 8


def test_iterator_state_resumes_mid_epoch_exactly(folder):
  ds = streaming.open_stream(f"folder:{folder}")
  straight = [image_ids(ds, x) for x, _ in ds.train_batches(8, 3, 0)]
  it = ds.train_batches(8, 3, 0)
  head = [image_ids(ds, next(it)[0]) for _ in range(2)]
  state = it.get_state().decode()
  rest = [image_ids(ds, x) for x, _ in ds.train_batches(8, 3, 0, resume={"iterator": state})]
  assert head + rest == straight


def test_test_batches_cover_the_test_set_once(folder):
  ds = streaming.open_stream(f"folder:{folder}")
  ids, weights = [], []
  for x, y, w in ds.test_batches(5):
    ids += image_ids(ds, x)
    weights += w.tolist()
  assert sorted(i for i, w in zip(ids, weights) if w) == list(range(100, 100 + N_TEST))


def test_truncated_image_is_named(tmp_path):
  root = write_folder(tmp_path / "img")
  bad = next((root / "train" / "class1").iterdir())
  bad.write_bytes(bad.read_bytes()[:40])
  with pytest.raises(data_lib.DataError, match=f"cannot read image {bad}"):
    data_lib.load(f"folder:{root}")
  with pytest.raises(data_lib.DataError, match=f"cannot read image {bad}"):
    ds = streaming.open_stream(f"folder:{root}")  # the statistics' sample reads it here,
    for _ in ds.train_batches(8, 0, 0):  # or a batch does, on a bigger dataset
      pass


def test_streaming_tfds_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=40):
    ds = streaming.open_stream("tfds:mnist")
    x, y = next(iter(ds.train_batches(8, 0, 0)))
  assert x.shape == (8, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
  assert ds.num_classes == 10


def test_bad_streaming_specs(tmp_path):
  with pytest.raises(data_lib.DataError, match="cannot be streamed"):
    streaming.open_stream("digits")
  with pytest.raises(data_lib.DataError, match="does not exist"):
    streaming.open_stream(f"folder:{tmp_path / 'none'}")


def test_streamed_run_killed_mid_epoch_resumes_the_missing_steps(folder, tmp_path, monkeypatch):
  def config():
    c = resnet34_config.get_config("smoke")
    c.mode, c.dataset, c.stream = "train", f"folder:{folder}", True
    c.batch_size, c.num_epochs = 8, 2
    c.checkpoint_every, c.log_every, c.augment = 2, 2, True
    return c

  straight = run_lib.run(config(), tmp_path / "straight")
  steps = {"n": 0}
  real_put = train_lib.Mesh1D.put_batch

  def counting_put(self, arrays):
    steps["n"] += 1
    if steps["n"] == 9:  # epoch 2, batch 3: checkpoints were written after batch 2
      raise KeyboardInterrupt("simulated kill")
    return real_put(self, arrays)

  monkeypatch.setattr(train_lib.Mesh1D, "put_batch", counting_put)
  with pytest.raises(KeyboardInterrupt):
    run_lib.run(config(), tmp_path / "resumed")
  steps["n"] = -100  # no more kills
  resumed = run_lib.run(config(), tmp_path / "resumed")
  # 6 steps per epoch; the rerun trains only epoch 2's batches 3..6 (+ evaluation batches).
  eval_batches = 3 * 2  # test set (12) in eval batches of 256 -> 1 per evaluation; 2 evals
  assert steps["n"] + 100 <= 4 + eval_batches
  assert resumed["accuracy"] == straight["accuracy"]
  assert resumed["baseline_test_loss"] == pytest.approx(straight["baseline_test_loss"], rel=1e-6)


def test_dataset_smaller_than_a_global_batch(folder, tmp_path):
  c = mlp_config.get_config("smoke")
  c.mode, c.dataset, c.stream, c.batch_size = "train", f"folder:{folder}", True, 64
  with pytest.raises(ValueError, match="larger than the 48 training examples"):
    run_lib.run(c, tmp_path)


TWO_HOSTS = """
import json, sys, jax, numpy as np
jax.config.update("jax_platforms", "cpu")
jax.distributed.initialize(coordinator_address="localhost:" + sys.argv[3], num_processes=2,
                           process_id=int(sys.argv[1]))
from gkq_jax.job.data import streaming
from gkq_jax.job.training import train as train_lib
from gkq_jax.job import models
from gkq_jax.job import report
from configs import mlp
ds = streaming.open_stream("folder:" + sys.argv[2])
ids = []
for x, _ in ds.train_batches(8, 0, 0):
  first = x[:, 0, 0, 0] * ds.prepare.std[0] + ds.prepare.mean[0]
  ids += np.rint(first).astype(int).tolist()
config = mlp.get_config("smoke")
tx = train_lib.create_optimizer("adamw", 1e-3, total_steps=6, warmup_steps=0, momentum=0.9,
                                weight_decay=0.0)
state = train_lib.init_state(models.create_model(config, 3), ds.sample_shape, tx, 0)
mesh = train_lib.Mesh1D()
import pathlib
workdir = pathlib.Path(sys.argv[4])  # shared by both hosts, as a run's workdir is
state = train_lib.fit(state, ds, train_lib.make_train_step(), num_epochs=1, batch_size=8, seed=0,
                      checkpoint_dir=workdir / "ckpt", mesh=mesh,
                      writer=report.MetricWriter(workdir), eval_batch_size=8)
acc = train_lib.evaluate(state, ds, 8, mesh)["test_accuracy"]
print(json.dumps({"ids": ids, "devices": jax.device_count(), "acc": acc}))
"""


def test_two_processes_read_disjoint_shards_and_train_together(folder, tmp_path):
  script = tmp_path / "host.py"
  script.write_text(TWO_HOSTS)
  port = str(20000 + os.getpid() % 20000)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(folder), port,
                             str(tmp_path / "work")], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
  hosts = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert hosts[0]["devices"] == 2
  assert not set(hosts[0]["ids"]) & set(hosts[1]["ids"])
  assert sorted(hosts[0]["ids"] + hosts[1]["ids"]) == list(range(N_TRAIN))
  assert hosts[0]["acc"] == hosts[1]["acc"]  # one model, evaluated across both hosts


def test_unprepared_tfds_name_says_how_to_prepare_or_what_to_pass():
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(data_lib.DataError) as error:
    streaming.open_stream("tfds:imagenet2012")  # never prepared on a test machine
  message = str(error.value)
  assert "\n" not in message
  assert "tfds build imagenet2012" in message and "--config.dataset=folder:" in message
