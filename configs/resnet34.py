"""ResNet-34 (CIFAR stem, as the seed's). Variants: ``:cifar10``, ``:survey_cifar10``
(every compression method side by side; GPU), ``:imagenet`` (ImageNet stem, streamed), ``:smoke``::

  python main.py --config=configs/resnet34.py            # digits, offline, 2-core CPU
  python main.py --config=configs/resnet34.py:cifar10    # tfds:cifar10 (prepared TFDS data)
  python main.py --config=configs/resnet34.py:cifar10 \
      --config.dataset=folder:../shared/datasets/cifar10-jpg.tar.gz   # a local image folder
  python main.py --config=configs/resnet34.py:imagenet   # tfds:imagenet2012, streamed (grain)
"""

from configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  c.model = "resnet34"
  c.survey.student = default.student_fields(width=int, stage_sizes=tuple)  # ResNet fields
  c.num_epochs = 5  # the offline default: ~8 min on 2 CPU cores (98% by epoch 4)
  c.batch_size = 64
  c.learning_rate = 0.05
  if variant in ("cifar10", "survey_cifar10"):
    c.dataset = "tfds:cifar10"
    c.num_epochs = 90
    c.batch_size = 256
    c.learning_rate = 0.1
    c.augment = True
    c.cutout = 16
    c.label_smoothing = 0.1
    c.resnet.dtype = "bfloat16"  # mixed precision: about 2x faster on a GPU, fp32 weights
  if variant == "survey_cifar10":
    c.mode = "survey"
    c.validation_size = 5000
    c.survey.methods = ("baseline", "gkq_4bit", "gkq_2bit", "lowrank", "prune_norm",
                        "remove_blocks", "distill", "qat_8bit", "qat_4bit", "qat_2bit",
                        "binary", "prune_norm+gkq_4bit", "lowrank+gkq_4bit")
    c.survey.epochs = 10
    c.survey.learning_rates = (0.01, 0.003)
    c.survey.lowrank_layers = r"^BasicBlock_\d+/Conv_[01]$"
    c.survey.remove_blocks = 3
    c.survey.student.width, c.survey.student.stage_sizes = 64, (2, 2, 2, 2)  # ResNet-18
    c.survey.student_epochs = 60
  elif variant == "cifar10":
    pass
  elif variant == "imagenet":
    # He et al.'s ImageNet recipe at batch 256 (Goyal et al.'s lr 0.1 per 256), streamed:
    # decoding and resizing in worker processes, each host reading its own shard, and
    # mid-epoch checkpoints (5,005 steps per epoch on one host).
    c.dataset = "tfds:imagenet2012"
    c.stream = True
    c.data_workers = 8
    c.image_size = 224
    c.resnet.stem = "imagenet"
    c.resnet.dtype = "bfloat16"
    c.num_epochs = 90
    c.batch_size = 256
    c.learning_rate = 0.1
    c.weight_decay = 1e-4
    c.warmup_epochs = 5.0
    c.augment = True
    c.label_smoothing = 0.1
    c.validation_size = 10_000  # carved from the training set; tfds' validation split is the test
    c.checkpoint_every = 1000
    c.finetune.epochs = 10
  elif variant == "smoke":
    c.model = "resnet_tiny"
    c.num_epochs = 1
    c.batch_size = 32
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of resnet34.py: use cifar10, "
                     "survey_cifar10, imagenet or smoke.")
  return c
