"""LeNet-300-100 (Deep Compression's MLP). Variants: ``:fashion_mnist``,
``:speech`` (the seed's 9-layer MLP with BatchNorm + Dropout), ``:smoke``."""

from configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  c.model = "mlp"
  c.num_epochs = 30
  c.batch_size = 64
  c.optimizer = "adamw"
  c.learning_rate = 2e-3
  c.weight_decay = 1e-4
  if variant == "fashion_mnist":
    c.dataset = "idx:../shared/datasets/fashion-mnist"
    c.num_epochs = 20
    c.batch_size = 128
  elif variant == "speech":
    c.mlp.hidden = (2048, 1950, 1750, 1600, 1400, 1300, 1200, 1000, 800)
    c.mlp.norm_every = 2
  elif variant == "smoke":
    c.num_epochs = 1
    c.batch_size = 32
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of mlp.py: use fashion_mnist, speech or smoke.")
  return c
