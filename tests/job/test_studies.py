"""Sensitivity and compare modes (gkq_jax.job.studies)."""



from gkq_jax.job import run as run_lib
from gkq_jax.job import studies
from tests.job.tiny import pipeline_config


def test_sensitivity_and_compare_modes(tmp_path):
  config = pipeline_config(mode="sensitivity")
  config.sensitivity.bits = (1, 4)
  config.init_checkpoint = ""
  results = run_lib.run(config, tmp_path / "sens")
  assert len(results["sensitivity"]) == 3 * 2
  assert (tmp_path / "sens" / "sensitivity.csv").exists()
  assert (tmp_path / "sens" / "sensitivity.png").exists()
  config = pipeline_config(mode="compare")
  config.compare.bits = (2,)
  config.compare.finetune_epochs = 1
  config.init_checkpoint = str(tmp_path / "sens" / "checkpoints" / "baseline")
  results = run_lib.run(config, tmp_path / "cmp")
  methods = {r["method"] for r in results["compare"]}
  assert methods == set(studies.COMPARE_METHODS)
  assert "| gkq grad_sq | 2 |" in (tmp_path / "cmp" / "compare.md").read_text()
