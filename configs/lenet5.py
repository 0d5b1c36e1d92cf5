"""LeNet-5 (Deep Compression's Caffe model).

Variants: ``:fashion_mnist``; ``:survey_fashion_mnist`` (every compression
method side by side, chosen on a 5,000-example validation split); ``:smoke``.
"""

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
  c.survey.student = default.student_fields(conv_widths=tuple, hidden=int)  # LeNet-5's fields
  if variant in ("fashion_mnist", "survey_fashion_mnist"):
    c.dataset = "tfds:fashion_mnist"
    c.num_epochs = 15
    c.batch_size = 128
  if variant == "survey_fashion_mnist":
    c.mode = "survey"
    c.validation_size = 5000
    c.survey.methods = ("baseline", "gkq_4bit", "gkq_2bit", "lowrank", "prune_norm",
                        "prune_datafree", "distill", "qat_8bit", "qat_4bit", "qat_2bit",
                        "binary", "prune_norm+gkq_4bit", "lowrank+gkq_4bit")
    c.survey.epochs = 1  # ~45 s per epoch on the 2-core CPU
    c.survey.learning_rates = (1e-3, 3e-4)
    c.survey.lowrank_layers = r"^(Conv_1|Dense_0)$"  # 98% of the weights
    c.survey.student.conv_widths, c.survey.student.hidden = (10, 25), 250  # half width
    c.survey.student_epochs = 8
  elif variant == "fashion_mnist":
    pass
  elif variant == "obd_fashion_mnist":
    # >= 40x: OBD pruning (h = damped g^2) ranked over all layers, then a 42,000-byte file with
    # each layer's k-means K or ECSQ price chosen for the least h-weighted distortion (biases
    # clustered too), then 4 epochs of training through the codebooks (qat).
    c.dataset = "tfds:fashion_mnist"
    c.num_epochs = 15
    c.batch_size = 128
    c.validation_size = 5000  # carved from the training set: every choice is made on it
    c.prune.enabled = True
    c.prune.method = "obd"
    c.prune.scope = "global"
    c.prune.sparsity = 0.9
    c.prune.rounds = 3
    c.prune.epochs_per_round = 2
    c.prune.learning_rate = 1e-3
    c.prune.distill = 1.0
    c.quantize.budget_bytes = 42_000
    c.quantize.damping = 1.0
    c.quantize.cluster_biases = True
    c.qat.enabled = True
    c.qat.epochs = 4
    c.qat.learning_rate = 5e-4
    c.qat.distill = 1.0
    c.finetune.epochs = 0
    c.finetune.learning_rate = 2e-4
    c.finetune.distill = 1.0
  elif variant == "smoke":
    c.num_epochs = 1
    c.batch_size = 32
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of lenet5.py: use fashion_mnist, "
                     "survey_fashion_mnist or smoke.")
  return c
