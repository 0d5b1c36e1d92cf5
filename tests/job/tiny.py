"""Tiny configs that drive the real job in seconds."""

from configs import mlp as mlp_config


def smoke(module=mlp_config, **overrides):
  """A config's ``:smoke`` variant in ``train`` mode."""
  config = module.get_config("smoke")
  config.log_every = 5
  config.mode = "train"
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def pipeline_config(**overrides):
  """LeNet-300-100 on digits through the whole pipeline: 2 pruning rounds, 3 bits."""
  c = mlp_config.get_config("smoke")
  c.num_epochs = 2
  c.log_every = 10
  c.prune.enabled = True
  c.prune.qualities = (0.6, 1.0)
  c.prune.epochs_per_round = 1
  c.quantize.bits = 3
  c.finetune.epochs = 1
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def budget_config(budget_bytes: int, **overrides):
  """:func:`pipeline_config` with OBD to 75% in 2 rounds and a byte budget;
  ``overrides`` as ``section__field=value`` (e.g. ``prune__sparsity=0.5``)."""
  c = pipeline_config(validation_size=200)
  c.prune.method = "obd"
  c.prune.sparsity = 0.75
  c.prune.rounds = 2
  c.quantize.budget_bytes = budget_bytes
  c.quantize.budget_clusters = (4, 8)
  c.quantize.budget_points = 4
  c.quantize.damping = 1.0
  for key, value in overrides.items():
    section, name = key.split("__")
    setattr(getattr(c, section), name, value)
  return c


def kill_stage_after_one_epoch(monkeypatch, stage: str) -> None:
  """Makes the first ``fit`` of ``stage`` train (and checkpoint) one epoch, then
  die as a killed process would; later calls run normally."""
  from gkq_jax.job.training import train as train_lib
  real_fit = train_lib.fit
  calls = {"n": 0}

  def killed(state, data, step, **kw):
    if kw["stage"] == stage and calls["n"] == 0:
      calls["n"] += 1
      real_fit(state, data, step, **{**kw, "num_epochs": 1})
      raise KeyboardInterrupt("simulated kill")
    return real_fit(state, data, step, **kw)

  monkeypatch.setattr(train_lib, "fit", killed)
