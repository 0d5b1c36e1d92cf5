"""Sensitivity and compare modes (gkq_jax.job.studies)."""



from gkq_jax.job import context
from gkq_jax.job import run as run_lib
from gkq_jax.job.modes import studies
from tests.job.tiny import pipeline_config


def test_sensitivity_and_compare_modes(tmp_path, monkeypatch):
  # Compiled programs are released after each layer / method (issue 25: memory mappings).
  released, release = [], context.release_compiled
  monkeypatch.setattr(context, "release_compiled", lambda: released.append(1) or release())
  config = pipeline_config(mode="sensitivity")
  config.sensitivity.bits = (1, 4)
  config.init_checkpoint = ""
  results = run_lib.run(config, tmp_path / "sens")
  assert len(results["sensitivity"]) == 3 * 2
  assert len(released) == 3
  assert (tmp_path / "sens" / "sensitivity.csv").exists()
  assert (tmp_path / "sens" / "sensitivity.png").exists()
  config = pipeline_config(mode="compare")
  config.compare.bits = (2,)
  config.compare.finetune_epochs = 1
  config.init_checkpoint = str(tmp_path / "sens" / "checkpoints" / "baseline")
  results = run_lib.run(config, tmp_path / "cmp")
  methods = {r["method"] for r in results["compare"]}
  assert methods == set(studies.COMPARE_METHODS)
  assert len(released) == 3 + len(studies.COMPARE_METHODS)
  assert "| gkq grad_sq | 2 |" in (tmp_path / "cmp" / "compare.md").read_text()
  # The README's 2-bit ordering where it holds at this size (seeds 0, 1, 2 run):
  # uniform quantization is far behind every k-means before fine-tuning (by 3.6
  # to 4.2 points) and fine-tuning wins much of it back (+3.3 to +9.2); no
  # method loses more than a point to fine-tuning (worst seen: -0.55). Between
  # the k-means variants the order changes from seed to seed on 1,438 images.
  rows = {r["method"]: r for r in results["compare"]}
  others = min(r["before_finetune"] for m, r in rows.items() if m != "uniform")
  assert rows["uniform"]["before_finetune"] < others - 0.02
  assert rows["uniform"]["after_finetune"] > rows["uniform"]["before_finetune"] + 0.02
  for row in rows.values():
    assert row["after_finetune"] >= row["before_finetune"] - 0.01, row
