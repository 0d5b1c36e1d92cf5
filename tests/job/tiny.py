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
