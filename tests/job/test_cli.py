"""main.py as a user runs it, and data parallelism across devices."""

import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = """
import jax, numpy as np
from configs import mlp
from gkq_jax.job.data import images as data_lib
from gkq_jax.job import models
from gkq_jax.job.training import train as train_lib
config = mlp.get_config("smoke"); config.batch_size = 32
ds = data_lib.load("digits")
model = models.create_model(config, 10)
tx = train_lib.create_optimizer("adamw", 2e-3, total_steps=40, warmup_steps=4, momentum=0.9,
                                weight_decay=1e-4)
state = train_lib.init_state(model, ds.sample_shape, tx, 0)
mesh = train_lib.Mesh1D()
state = mesh.replicate(state)
step = jax.jit(train_lib.train_step)
losses = []
for i, batch in enumerate(ds.train_batches(32, 0, 0)):
  state, m = step(state, mesh.put_batch(batch), jax.random.PRNGKey(i))
  losses.append(float(m["loss"]))
  if i == 9: break
print(jax.device_count(), repr(losses))
"""


def test_data_parallel_over_four_devices_matches_one():
  outs = {}
  for n in (1, 4):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, text=True,
                         capture_output=True, check=True)
    devices, losses = out.stdout.strip().split(" ", 1)
    assert int(devices) == n
    outs[n] = eval(losses)
  np.testing.assert_allclose(outs[4], outs[1], rtol=2e-4)


def test_main_cli_smoke_and_locked_config(tmp_path):
  # Without --workdir the run goes to runs/<config>-<variant> under the current folder.
  subprocess.run([sys.executable, str(ROOT / "main.py"), f"--config={ROOT}/configs/mlp.py:smoke"],
                 cwd=tmp_path, check=True, capture_output=True, text=True)
  assert (tmp_path / "runs" / "mlp-smoke" / "results.json").exists()
  cmd = [sys.executable, "main.py", "--config=configs/mlp.py:smoke", f"--workdir={tmp_path}"]
  bad = subprocess.run(cmd + ["--config.num_epoch=3"], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode != 0 and "num_epoch" in bad.stderr
  bad = subprocess.run(cmd + ["--config.dataset=idx:/no/such/dir"], cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith("error: idx: directory /no/such/dir")
