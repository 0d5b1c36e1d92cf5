"""ResNet-34 (CIFAR stem, as the seed's). Variants: ``:cifar10``, ``:smoke``.

python main.py --config=configs/resnet34.py            # digits, offline, 2-core CPU
python main.py --config=configs/resnet34.py:cifar10    # ../shared/datasets CIFAR-10 archive
"""

from configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  c.model = "resnet34"
  c.num_epochs = 10
  c.batch_size = 64
  c.learning_rate = 0.05
  if variant == "cifar10":
    c.dataset = "folder:../shared/datasets/cifar10-jpg.tar.gz"
    c.num_epochs = 90
    c.batch_size = 256
    c.learning_rate = 0.1
    c.augment = True
    c.cutout = 16
    c.label_smoothing = 0.1
    c.resnet.dtype = "bfloat16"  # mixed precision: about 2x faster on a GPU, fp32 weights
  elif variant == "smoke":
    c.model = "resnet_tiny"
    c.num_epochs = 1
    c.batch_size = 32
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of resnet34.py: use cifar10 or smoke.")
  return c
