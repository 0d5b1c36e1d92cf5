"""all-MiniLM-L6-v2 (sentence-transformers, BERT, 22.7 M parameters) measured on code search.

``python main.py --config=configs/minilm.py`` (mode ``embeddings``,
gkq_jax/job/modes/embeddings.py): the checkpoint folder read into Flax, a retrieval task from
the standard library (each function's docstring the query, its ``def`` line the document; 512
calibration pairs and 1,000 evaluation pairs from other files, recorded in
retrieval_task.json), then top-1 accuracy and MRR of the fp32 embeddings and dense
sentences/s at batch 1 and 32.

``checkpoint`` is a folder relative to the repository root (or the working directory) or an
absolute one, or ``hf:owner/name``: ``--config.checkpoint=<folder>`` measures any other
BERT / sentence-transformers checkpoint.

Variants: ``:ptq`` (mode ``ptq``, gkq_jax/job/modes/ptq.py: the checkpoint compressed by
RTN, qwix, k-means and gkq side by side, calibrated on the task's calibration pairs);
``:smoke`` (a small task for a tiny model; the tests write a random BERT in Hugging Face
layout and pass its folder as ``checkpoint``).
"""

import ml_collections

from configs import default, llama


def get_config(variant: str = ""):
  c = default.get_config()
  c.model = "bert"
  c.dataset = "python-stdlib code search"
  c.mode = "embeddings"
  c.checkpoint = "../shared/models/all-MiniLM-L6-v2"
  c.embeddings = ml_collections.ConfigDict(dict(
      calibration_size=512,  # pairs the compression modes may calibrate on
      evaluation_size=1000,  # pairs measured on (from other files)
      max_files=0,  # 0: every standard-library file; n: the first n of the seeded order
      batch_size=64,  # texts per embedding call
      max_length=0,  # tokens per text (0: the checkpoint's max_seq_length)
      neighbours=10,  # k of the top-k neighbour overlap with the fp32 embeddings
      serving_batch=32,  # sentences/s measured at batch 1 and at this batch
      throughput_repeats=10))
  c.ptq = llama.ptq_section(calibration_batches=16, calibration_batch_size=32)
  if variant == "ptq":
    c.mode = "ptq"
  elif variant == "smoke":
    c.checkpoint = ""  # the test's tiny random BERT folder
    c.embeddings.update(dict(calibration_size=16, evaluation_size=48, max_files=60,
                             batch_size=16, serving_batch=4, throughput_repeats=2))
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of minilm.py: use ptq or smoke.")
  return c
