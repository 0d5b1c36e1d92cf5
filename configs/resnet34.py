"""ResNet-34 (CIFAR stem, as the seed's). Variants: ``:cifar10``, ``:survey_cifar10``
(every compression method side by side; GPU), ``:smoke``.

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
  if variant in ("cifar10", "survey_cifar10"):
    c.dataset = "folder:../shared/datasets/cifar10-jpg.tar.gz"
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
    c.survey.student = dict(stage_sizes=(2, 2, 2, 2))  # ResNet-18
    c.survey.student_epochs = 60
  elif variant == "cifar10":
    pass
  elif variant == "smoke":
    c.model = "resnet_tiny"
    c.num_epochs = 1
    c.batch_size = 32
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of resnet34.py: use cifar10, "
                     "survey_cifar10 or smoke.")
  return c
