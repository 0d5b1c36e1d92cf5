"""A small Llama-architecture language model, trained here offline on the Python standard library.

``python main.py --config=configs/llama.py`` (mode ``lm``, gkq_jax/job/modes/lm.py): the
running interpreter's ``.py`` files split by file (seeded, recorded in corpus_split.json), a
3 M-parameter Llama (hidden 256, 4 layers, 4 query / 2 key-value heads, SwiGLU 688, tied
embeddings) on byte-level tokens trained from scratch with AdamW, saved in Hugging Face layout
in <workdir>/checkpoint and read back, then perplexity and bits per byte over the whole
validation and test splits and dense tokens/s at batch 1 and 32. A killed run, rerun with the
same --workdir, resumes from its last checkpoint.

Any other Llama checkpoint is measured instead of training one:
``--config.checkpoint=<folder>`` (config.json, model.safetensors, tokenizer.json) or
``--config.checkpoint=hf:owner/name``.

Variants: ``:bpe`` (a byte-level BPE of 2,048 ids trained on the train split instead of bytes);
``:smoke`` (a tiny model on 12 files, seconds); ``:ptq`` (mode ``ptq``,
gkq_jax/job/modes/ptq.py: the model trained by the default run, runs/llama/checkpoint,
compressed by RTN, qwix, k-means and gkq side by side; ``:ptq_smoke``, the same in seconds on
the checkpoint given as ``--config.checkpoint``).
"""

import ml_collections

from configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  c.model = "llama"
  c.dataset = "python-stdlib"
  c.mode = "lm"
  # "": train from scratch; a Hugging Face folder or hf:owner/name: measure that Llama instead.
  c.checkpoint = ""
  c.optimizer = "adamw"  # the lm mode always trains with AdamW (b2 0.95, clipped)
  c.learning_rate = 2e-3
  c.weight_decay = 0.1
  c.batch_size = 16  # windows of lm.seq_len tokens per step
  c.eval_batch_size = 16  # windows per call while measuring perplexity
  c.log_every = 25
  c.checkpoint_every = 100  # steps between the orbax checkpoints a rerun resumes from
  c.lm = ml_collections.ConfigDict(dict(
      tokenizer="byte",  # or "bpe": byte-level BPE trained on the train split
      bpe_vocab_size=2048,
      seq_len=256,
      hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2,
      tie_embeddings=True, rope_theta=10000.0,
      # 0.8 steps/s on 2 idle CPU cores (~17 min); 0.5 steps/s (27 min) while another job
      # held one of the two cores.
      steps=800, warmup_steps=80,
      final_lr_ratio=0.1,  # the cosine decay ends at this fraction of learning_rate
      clip_norm=1.0,  # global gradient norm (0: no clipping)
      fractions=(0.9, 0.05, 0.05),  # train / validation / test, by file
      max_files=0,  # 0: every file; n: the first n of the seeded order (quick runs)
      serving_batch=32,  # tokens/s measured at batch 1 and at this batch
      throughput_repeats=5))
  c.ptq = ptq_section()
  if variant in ("ptq", "ptq_smoke"):
    c.mode = "ptq"
    c.checkpoint = "runs/llama/checkpoint"  # python main.py --config=configs/llama.py
  if variant == "bpe":
    c.lm.tokenizer = "bpe"
  elif variant == "smoke":
    c.batch_size = 4
    c.eval_batch_size = 64
    c.log_every = 4
    c.checkpoint_every = 4
    c.lm.update(dict(seq_len=32, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, steps=12, warmup_steps=2,
                     fractions=(0.5, 0.25, 0.25), max_files=12, serving_batch=4,
                     throughput_repeats=2, bpe_vocab_size=300))
  elif variant == "ptq_smoke":
    c.checkpoint = ""  # the test's tiny Llama folder
    c.eval_batch_size = 8
    c.lm.update(dict(seq_len=32, fractions=(0.5, 0.25, 0.25), max_files=12))
    c.ptq.update(dict(bits=(2,), calibration_batches=2, calibration_batch_size=2,
                      eval_tokens=2048, group_size=16, packed_method=""))
  elif variant and variant != "ptq":
    raise ValueError(f"unknown variant {variant!r} of llama.py: use bpe, smoke, ptq or "
                     "ptq_smoke.")
  return c


def ptq_section(**overrides) -> ml_collections.ConfigDict:
  """The ``ptq`` mode's settings (shared with configs/minilm.py)."""
  section = ml_collections.ConfigDict(dict(
      # gkq_jax/job/modes/ptq.py METHODS, each at every bits (qwix's types once each)
      methods=("rtn", "rtn_mse", "rtn_g128", "qwix_int8", "qwix_int4", "kmeans", "gkq_abs",
               "gkq_fisher", "gkq_fisher_g128", "gkq_fisher_sparse", "gkq_fisher_alloc", "gkq_act",
               "gkq_act_ef", "gkq_fisher_ef"),
      bits=(4, 3, 2),  # 2**bits levels / codebook entries per channel or group
      pattern="kernel$",  # the matrices compressed: every Linear kernel
      embeddings=False,  # also the token embedding (and so a tied output matrix)
      group_size=128,  # input rows per group of the *_g128 methods
      sparse_fraction=0.0045,  # of each matrix kept exactly by gkq_fisher_sparse
      codebook_dtype="float16",  # codebooks rounded to this: 2 bytes an entry in the file
      feedback_rounds=2,  # *_ef: (error-feedback indices, codebook refit) rounds
      packed_method="gkq_act_ef",  # batch-1 speed from packed weights vs dense ("": none)
      packed_bits=4,
      calibration_batches=16,  # importance: batches of the train split / calibration pairs
      calibration_batch_size=8,
      calibration_length=128,  # tokens per calibration text (embeddings)
      eval_tokens=65536))  # tokens of each evaluation split measured (0: all)
  section.update(overrides)
  return section
