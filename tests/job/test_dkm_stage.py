"""The Deep k-Means stage (gkq_jax/job/dkm_stage.py) and WRN-16-4 in the job."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gkq_jax as gkq
from configs import lenet5 as lenet5_config
from configs import wrn16_4
from gkq_jax.job import models
from gkq_jax.job import run as run_lib
from gkq_jax.job.modes import dkm_stage
from tests.job.tiny import kill_stage_after_one_epoch, pipeline_config


def _dkm_config(**overrides):
  config = pipeline_config(**overrides)
  config.prune.enabled = False
  config.quantize.bits = 2
  config.dkm.enabled = True
  config.dkm.epochs = 2
  config.dkm.refresh_every = 7  # refreshes fall inside epochs, not on their edges
  config.dkm.strength = 0.05
  config.finetune.epochs = 0
  return config


def test_killed_dkm_stage_resumes_identically(tmp_path, monkeypatch):
  straight = run_lib.run(_dkm_config(num_epochs=1), tmp_path / "straight")
  # The same baseline, so that only the dkm stage runs twice.
  config = _dkm_config(init_checkpoint=str(tmp_path / "straight" / "checkpoints" / "baseline"))
  kill_stage_after_one_epoch(monkeypatch, "dkm")
  with pytest.raises(KeyboardInterrupt):
    run_lib.run(config, tmp_path / "resumed")
  resumed = run_lib.run(config, tmp_path / "resumed")
  assert "dkm" in straight["accuracy"]
  assert resumed["accuracy"] == straight["accuracy"]
  # The files are byte-identical: the same weights came out of the resumed stage.
  assert ((tmp_path / "resumed" / "model.gkq").read_bytes()
          == (tmp_path / "straight" / "model.gkq").read_bytes())


def test_bad_dkm_settings_name_the_field():
  for field, value, message in (("strength", -0.1, r"dkm.strength \(the regulariser's lambda\)"),
                                ("refresh_every", 0, r"dkm.refresh_every \(T"),
                                ("form", "svd", "dkm.form='svd'")):
    config = _dkm_config()
    setattr(config.dkm, field, value)
    with pytest.raises(ValueError, match=message):
      dkm_stage.check_config(config)
  config = _dkm_config()
  config.quantize.granularity = "row"
  config.prune.enabled = True
  with pytest.raises(ValueError, match="quantize.granularity='row' has no pinned zero"):
    dkm_stage.check_config(config)


def test_wrn16_4_is_the_papers_size():
  model = models.create_model(wrn16_4.get_config("cifar10"), 10)
  x = jnp.ones((2, 32, 32, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  assert sum(np.prod(s.shape) for s in jax.tree.leaves(shapes["params"])) == 2_748_890
  assert model.dropout == 0.3 and (model.depth, model.widen) == (16, 4)
  # Training mode draws dropout masks (traced only: no compilation).
  logits, _ = jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                   rngs={"dropout": jax.random.PRNGKey(1)}),
                             shapes)
  assert logits.shape == (2, 10)


def test_lenet5_row_sharing_after_dkm_through_the_pipeline(tmp_path):
  config = lenet5_config.get_config("smoke")
  config.log_every = 10
  config.quantize.granularity = "row"
  config.quantize.bits = 2
  config.quantize.rules = ("Conv_0/kernel$=k3",)  # K per layer, not only powers of two
  config.dkm.enabled = True
  config.dkm.epochs = 1
  config.dkm.refresh_every = 10
  results = run_lib.run(config, tmp_path)
  assert list(results["accuracy"])[:2] == ["baseline", "dkm"]
  assert results["accuracy"]["compressed_file"] == results["accuracy"]["finetuned"]
  assert results["deep_kmeans_ratio"] > 20
  loaded = gkq.load(tmp_path / "model.gkq")["params"]
  for path, leaf in gkq.clustered_leaves(loaded):
    dense = np.asarray(leaf.dequantize())
    k = 3 if path == "Conv_0/kernel" else 4
    if path.startswith("Dense"):  # Dense kernels are shared as scalars, one codebook each
      assert leaf.vector_shape is None and len(np.unique(dense)) <= k
      continue
    assert leaf.vector_shape == (5,) and leaf.vector_axis == 1
    rows = np.moveaxis(dense, 1, -1).reshape(-1, 5)
    assert len(np.unique(rows, axis=0)) <= k, path
  assert "Deep k-Means accounting" in (tmp_path / "report.md").read_text()
