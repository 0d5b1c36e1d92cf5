"""Defaults shared by every config; the model configs import and override these."""

import ml_collections


def student_fields(**types) -> ml_collections.ConfigDict:
  """survey.student with each named model field unset (None) but typed, so that
  --config.survey.student.<field>=... works from the command line."""
  return ml_collections.ConfigDict(
      {name: ml_collections.FieldReference(None, field_type=kind) for name, kind in types.items()})


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "resnet34"
  c.dataset = "digits"  # offline default; see gkq_jax/job/data.py for the specs
  # Stream tfds: / folder: datasets through grain instead of loading them into
  # memory (for data that does not fit; each host reads its own shard).
  c.stream = False
  c.data_workers = 0  # grain worker processes decoding images (with stream)
  c.num_epochs = 10
  c.batch_size = 64
  c.eval_batch_size = 256
  c.optimizer = "sgd"  # or "adamw"
  c.learning_rate = 0.05
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.warmup_epochs = 1.0
  c.image_size = 0  # resize images to this square size (0: as they are)
  c.augment = False  # random crop (pad 4) + horizontal flip
  c.cutout = 0  # with augment: side of a random square set to 0 (16 for CIFAR-10)
  c.label_smoothing = 0.0  # of the training loss (evaluation uses the plain loss)
  c.seed = 0
  # Examples carved from the training set (drawn by seed) to choose schedules
  # and hyperparameters on; reports then give validation and test accuracy.
  c.validation_size = 0
  c.log_every = 50
  c.checkpoint_every = 0  # steps between mid-epoch checkpoints (0: end of each epoch only)
  c.distributed = False  # jax.distributed.initialize() for multi-host runs
  c.mode = "compress"  # "train", "compress", "sensitivity", "compare" or "survey"
  c.init_checkpoint = ""  # a checkpoint folder (e.g. runs/x/checkpoints/baseline) to start from

  c.prune = ml_collections.ConfigDict(dict(
      enabled=False, qualities=(0.5, 0.8, 1.1), epochs_per_round=2, learning_rate=0.01,
      distill=0.0))  # weight of distillation from the unpruned model while retraining
  # Optimal Brain Damage instead of quality x std: each round removes the weights of least
  # saliency h w^2 (h: quantize.importance), rounds on Zhu & Gupta's cubic ramp to `sparsity`.
  c.prune.method = "magnitude"  # or "obd"
  c.prune.sparsity = 0.9  # obd: final fraction of the selected weights removed, in [0, 1)
  c.prune.rounds = 4  # obd: rounds of pruning + epochs_per_round of retraining
  c.prune.scope = "layer"  # obd: "layer" (each to `sparsity`) or "global" (ranked all at once)
  c.quantize = ml_collections.ConfigDict(dict(
      bits=4,  # default for every Dense/Conv kernel
      rules=(),  # extra "regex=bits" rules, first match wins, e.g. ("Dense_0/kernel$=6",)
      importance="grad_sq",  # "abs_grad", "grad_sq" or "none"
      importance_batches=20,
      method="hist", init="dp", objective="l2",
      granularity="layer",
      # with granularity="channel": one codebook per group_size consecutive input rows of
      # each output channel (coremltools' per_grouped_channel); 0: one per whole channel
      group_size=0))
  # budget_bytes > 0: model.gkq at most this many bytes; each layer gets the k-means K / ECSQ price
  # (budget_methods) that minimises the total importance-weighted distortion ("optimal"), or one
  # setting for all layers ("same"). pin_zero: an exact zero in every codebook (ECSQ may prune).
  c.quantize.budget_bytes = 0
  c.quantize.budget_methods = ("kmeans", "ecsq")
  c.quantize.allocation = "optimal"
  c.quantize.pin_zero = False
  c.quantize.budget_clusters = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # k-means K tried per layer
  c.quantize.budget_points = 12  # ECSQ prices per bit (and uniform widths) tried per layer
  # h + damping x mean(h) per layer for OBD and quantization (gkq.damp_importance): 0 = raw g^2
  c.quantize.damping = 0.0
  c.quantize.cluster_biases = False  # biases clustered too (worth it when every byte counts)
  # Deep k-Means retraining before quantization (gkq_jax/dkm.py, job/dkm_stage.py): the k-means
  # regulariser lambda/2 ||W - W F F^T||^2 at the quantizer's K and granularity (conv rows /
  # filters for "row" / "vector"), F refreshed every refresh_every steps.
  c.dkm = ml_collections.ConfigDict(dict(
      enabled=False, strength=0.01, refresh_every=100, epochs=2, learning_rate=1e-3,
      strength_start=0.0,  # > 0: lambda ramps geometrically from this to `strength`
      form="indicator",  # or "spectral" (only while K < rank W)
      importance="none",  # "grad_sq" / "abs_grad": the importance-weighted variant
      on_degenerate="raise"))  # spectral at K >= rank: "raise" or "indicator" (warn, fall back)
  # Quantization-aware retraining after quantization (job/qat_stage.py): the float weights
  # trained through the values they are assigned to (straight-through), codebooks re-fitted
  # each epoch, then fine-tuning on the shared values as without it.
  c.qat = ml_collections.ConfigDict(dict(
      enabled=False, epochs=4, learning_rate=1e-3,
      distill=0.0))  # weight of distillation from the uncompressed model
  c.finetune = ml_collections.ConfigDict(dict(
      epochs=2, learning_rate=0.01, reduce="mean",  # "sum": Deep Compression's rule
      distill=0.0))  # weight of distillation from the uncompressed model
  c.sensitivity = ml_collections.ConfigDict(dict(bits=(1, 2, 4, 8)))
  c.compare = ml_collections.ConfigDict(dict(bits=(2, 3, 4), finetune_epochs=1))
  # equal_bytes mode: methods at the bytes of `bits`-bit fixed-width codebooks (job/equal_bytes.py)
  c.equal_bytes = ml_collections.ConfigDict(dict(
      bits=(4, 3, 2), finetune_epochs=2,
      methods=("kmeans", "gkq grad_sq", "ecsq grad_sq", "ecsq grad_sq damped", "uniform + huffman",
               "optimal allocation damped")))
  # survey mode (gkq_jax/job/survey.py): every method from one baseline, measured alike.
  c.survey = ml_collections.ConfigDict(dict(
      methods=("baseline", "gkq_4bit", "gkq_2bit", "lowrank", "prune_norm", "distill",
               "qat_8bit", "qat_4bit", "qat_2bit", "binary", "prune_norm+gkq_4bit",
               "lowrank+gkq_4bit"),
      epochs=2,  # fine-tuning epochs of every method, from the baseline's weights
      learning_rates=(1e-3,),  # each method's fine-tuning rate, chosen on validation accuracy
      lowrank_layers="",  # regex of the layers to factorize ("": every Dense / Conv)
      lowrank_ratio=0.25,  # parameters kept per factorized layer: r (m + n) <= ratio m n
      lowrank_energy=0.0,  # > 0: rank by this kept fraction of sum(s^2) instead
      sparse_fraction=0.01,  # lowrank_sparse: share of each kernel in the sparse residual
      prune_fraction=0.5,  # share of every layer's filters / neurons removed
      remove_blocks=2,  # residual blocks removed by remove_blocks (ResNets)
      # distill: the student's model fields; unset ones default to the model at half width.
      student=student_fields(hidden=tuple, conv_widths=tuple, width=int, widen=int),
      student_epochs=10,  # distill: the student trains from scratch
      distill_weight=1.0, distill_temperature=4.0,
      latency_batches=(1, 256), latency_repeats=30))
  c.mlp = ml_collections.ConfigDict(dict(hidden=(300, 100), norm_every=0, dropout=0.5))
  c.wrn = ml_collections.ConfigDict(dict(depth=16, widen=4, dropout=0.3))  # model "wrn"
  c.resnet = ml_collections.ConfigDict(dict(
      stem="cifar", width=64,
      dtype="float32"))  # compute type; "bfloat16" = mixed precision on GPU / TPU
  return c
