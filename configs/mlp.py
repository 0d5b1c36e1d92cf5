"""LeNet-300-100 (Deep Compression's MLP).

Variants: ``:fashion_mnist``; ``:dc_fashion_mnist`` (Deep Compression's
setting: iterative pruning to ~7% of the weights, 4-5 bit codebooks, Huffman);
``:compare_fashion_mnist`` (quantization methods side by side at 2/3/4 bits);
``:speech`` (the seed's 9-layer MLP with BatchNorm + Dropout);
``:survey_fashion_mnist`` (every compression method side by side, chosen on a
5,000-example validation split); ``:smoke``.
"""

from configs import default


def _fashion_mnist_with_validation(c):
  c.dataset = "tfds:fashion_mnist"
  c.num_epochs = 20
  c.batch_size = 128
  c.validation_size = 5000  # carved from the training set: every choice is made on it


def get_config(variant: str = ""):
  c = default.get_config()
  c.model = "mlp"
  c.num_epochs = 30
  c.batch_size = 64
  c.optimizer = "adamw"
  c.learning_rate = 2e-3
  c.weight_decay = 1e-4
  if variant in ("fashion_mnist", "dc_fashion_mnist", "compare_fashion_mnist",
                 "survey_fashion_mnist"):
    c.dataset = "tfds:fashion_mnist"
    c.num_epochs = 20
    c.batch_size = 128
  if variant == "dc_fashion_mnist":
    # Gradual pruning (4 rounds, ~7% kept), distilling from the unpruned model
    # while retraining; 5-bit codebook for the 784x300 layer, 4-bit elsewhere.
    c.prune.enabled = True
    c.prune.qualities = (0.5, 0.75, 0.9, 0.9)
    c.prune.epochs_per_round = 10
    c.prune.learning_rate = 1e-3
    c.prune.distill = 1.0
    c.quantize.bits = 4
    c.quantize.rules = ("Dense_0/kernel$=5",)
    c.finetune.epochs = 3
    c.finetune.learning_rate = 2e-4
  elif variant == "compare_fashion_mnist":
    c.mode = "compare"
    c.compare.bits = (2, 3, 4)
    c.compare.finetune_epochs = 2
    c.finetune.learning_rate = 5e-4
  elif variant == "fashion_mnist":
    pass
  elif variant == "survey_fashion_mnist":
    c.mode = "survey"
    c.validation_size = 5000
    c.survey.methods = ("baseline", "gkq_4bit", "gkq_2bit", "lowrank", "lowrank_sparse",
                        "prune_norm", "prune_datafree", "distill", "qat_8bit", "qat_4bit",
                        "qat_2bit", "binary", "prune_norm+gkq_4bit", "lowrank+gkq_4bit")
    c.survey.epochs = 3
    c.survey.learning_rates = (1e-3, 3e-4)
    c.survey.lowrank_layers = r"^Dense_[01]$"  # the 10-way head is too small to factorize
    c.survey.student.hidden = (100, 50)
    c.survey.student_epochs = 20
  elif variant == "obd_fashion_mnist":
    # >= 50x: Optimal Brain Damage pruning (h w^2, h = damped g^2) ranked over all layers on a
    # cubic ramp, distilling from the unpruned model; a 21,000-byte file with each layer's
    # k-means K or ECSQ price chosen for the least h-weighted distortion (biases clustered too);
    # then 10 epochs of training through the codebooks (qat). Chosen on the validation split.
    _fashion_mnist_with_validation(c)
    c.prune.enabled = True
    c.prune.method = "obd"
    c.prune.scope = "global"
    c.prune.sparsity = 0.88
    c.prune.rounds = 4
    c.prune.epochs_per_round = 10
    c.prune.learning_rate = 1e-3
    c.prune.distill = 1.0
    c.quantize.budget_bytes = 21_000
    c.quantize.damping = 1.0
    c.quantize.cluster_biases = True
    c.qat.enabled = True
    c.qat.epochs = 10
    c.qat.learning_rate = 5e-4
    c.qat.distill = 1.0
    c.finetune.epochs = 0  # after qat, fine-tuning on shared values lost validation accuracy
    c.finetune.learning_rate = 2e-4
    c.finetune.distill = 1.0
  elif variant == "equal_bytes_fashion_mnist":
    _fashion_mnist_with_validation(c)
    c.mode = "equal_bytes"
    c.quantize.damping = 1.0  # chosen on validation: 0.1, 1 and per-layer means tried
    c.equal_bytes.bits = (4, 3, 2)
    c.equal_bytes.finetune_epochs = 2
    c.finetune.learning_rate = 5e-4
  elif variant == "speech":
    c.mlp.hidden = (2048, 1950, 1750, 1600, 1400, 1300, 1200, 1000, 800)
    c.mlp.norm_every = 2
  elif variant == "smoke":
    c.num_epochs = 1
    c.batch_size = 32
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of mlp.py: use fashion_mnist, "
                     "dc_fashion_mnist, compare_fashion_mnist, survey_fashion_mnist, speech "
                     "or smoke.")
  return c
