"""LeNet-5 (Deep Compression's Caffe model). Variants: ``:fashion_mnist``, ``:smoke``."""

from configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  c.model = "lenet5"
  c.num_epochs = 30
  c.batch_size = 64
  c.optimizer = "adamw"
  c.learning_rate = 2e-3
  c.weight_decay = 1e-4
  c.image_size = 28  # LeNet-5's two valid 5x5 convs need MNIST-sized inputs
  if variant == "fashion_mnist":
    c.dataset = "idx:../shared/datasets/fashion-mnist"
    c.num_epochs = 15
    c.batch_size = 128
  elif variant == "smoke":
    c.num_epochs = 1
    c.batch_size = 32
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of lenet5.py: use fashion_mnist or smoke.")
  return c
