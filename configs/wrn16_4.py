"""WRN-16-4 (dropout 0.3), Deep k-Means' CIFAR-10 model. Variants: ``:cifar10``, ``:smoke``::

  python main.py --config=configs/wrn16_4.py            # digits, offline, CPU
  python main.py --config=configs/wrn16_4.py:cifar10    # tfds:cifar10 (GPU); a local copy:
      --config.dataset=folder:../shared/datasets/cifar10-jpg.tar.gz

``:cifar10`` is Deep k-Means' setting: train WRN-16-4, retrain with the k-means
regulariser at the sharing's K, share the conv kernels' rows (vectors of 3)
with K = 4 per layer (``quantize.bits=2``; the Dense head gets a per-layer
codebook of 4 values), fine-tune on the shared values and write the file.
Deep k-Means' ratios 45x / 47x / 50x (conv layers only, K x d x 32 codebook
bits + N x H index bits) correspond to about 2.13 / 2.04 / 1.92 index bits
per row of 3; the report prints that accounting (``deep_kmeans_ratio``) beside
the real file's. Other K per layer: ``--config.quantize.rules='("stem/kernel$=k8",)'``.
"""

from configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  c.model = "wrn"
  c.wrn.depth = 16
  c.wrn.widen = 4
  c.wrn.dropout = 0.3
  c.num_epochs = 10
  c.batch_size = 64
  c.optimizer = "sgd"
  c.learning_rate = 0.05
  c.weight_decay = 5e-4
  c.quantize.granularity = "row"  # conv kernels as kernel rows, the head per layer
  c.quantize.bits = 2  # K = 4 rows per conv layer
  c.dkm.enabled = True
  c.dkm.epochs = 2
  c.dkm.learning_rate = 0.01
  if variant == "cifar10":
    c.dataset = "tfds:cifar10"
    c.validation_size = 5000  # lambda, T and epochs are chosen on this split
    c.num_epochs = 100
    c.batch_size = 128
    c.learning_rate = 0.1
    c.augment = True
    c.resnet.dtype = "bfloat16"  # compute type of the conv stack (fp32 weights)
    c.dkm.epochs = 20
    c.dkm.learning_rate = 0.01
    c.dkm.strength = 0.01
    c.dkm.refresh_every = 350  # about one epoch of 45,000 / 128
    c.finetune.epochs = 10
    c.finetune.learning_rate = 0.005
  elif variant == "smoke":
    c.wrn.depth = 10
    c.wrn.widen = 1
    c.num_epochs = 1
    c.batch_size = 32
    c.dkm.epochs = 1
    c.dkm.refresh_every = 7
    c.finetune.epochs = 1
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of wrn16_4.py: use cifar10 or smoke.")
  return c
