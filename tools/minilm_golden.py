"""Reference sentence embeddings of all-MiniLM-L6-v2 from the sentence-transformers library.

tests/job/test_hf_models.py checks that the job's flax.nnx BERT, loaded by
gkq_jax.job.models.hf, embeds the same sentences to within 1e-4 of these
values and tokenizes them to the same ids. The reference needs torch, which
the project does not depend on, so this runs once in a throw-away environment
outside the repository and its output, tests/data/minilm_golden.json, is
committed:

  python -m venv /tmp/st-venv
  /tmp/st-venv/bin/pip install torch==2.13.0          # the CPU build
  /tmp/st-venv/bin/pip install sentence-transformers  # keeps that torch
  HF_HUB_OFFLINE=1 /tmp/st-venv/bin/python tools/minilm_golden.py

It reads the local folder ../shared/models/all-MiniLM-L6-v2 (no download).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "all-MiniLM-L6-v2"
OUT = ROOT / "tests" / "data" / "minilm_golden.json"
COMMAND = "HF_HUB_OFFLINE=1 /tmp/st-venv/bin/python tools/minilm_golden.py"

# Varied lengths, so the short ones are padded against the long one in a
# batch; punctuation, accents, a dash, an emoji and CJK characters exercise
# the BERT normalizer and word-piece splits.
SENTENCES = [
  "Hello!",
  "The quick brown fox jumps over the lazy dog.",
  "Weight clustering shares one value among many weights, so a network is stored as a "
  "small codebook and an index per weight; fine-tuning the shared values recovers most of "
  "the accuracy that rounding to the nearest centroid loses, even at a few bits per weight.",
  "Café déjà vu — naïve coöperation, ¿qué tal? 🙂 東京は晴れ。",
  "k-means (Lloyd, 1957/1982) & Deep Compression [Han et al., 2016]: 35x-49x smaller!",
  "a",
]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", type=pathlib.Path, default=MODEL)
  parser.add_argument("--out", type=pathlib.Path, default=OUT)
  args = parser.parse_args(argv)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the local folder only, never the hub
  import sentence_transformers
  import torch
  import transformers

  model = sentence_transformers.SentenceTransformer(str(args.model), device="cpu")
  features = model.preprocess(SENTENCES)  # one batch: padded to the longest sentence
  embeddings = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
  golden = {
    "command": COMMAND,
    "model": "all-MiniLM-L6-v2 (../shared/models/all-MiniLM-L6-v2)",
    "versions": {"sentence-transformers": sentence_transformers.__version__,
                 "transformers": transformers.__version__, "torch": torch.__version__,
                 "python": platform.python_version()},
    "max_seq_length": model.max_seq_length,
    "sentences": SENTENCES,
    "input_ids": features["input_ids"].tolist(),
    "attention_mask": features["attention_mask"].tolist(),
    "embeddings": [[float(x) for x in row] for row in embeddings],
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(_dumps(golden))
  print(f"wrote {args.out} ({len(SENTENCES)} sentences, {embeddings.shape[1]} dimensions)")
  return 0


def _dumps(golden: dict) -> str:
  """JSON with one line per key and per row of a table: readable in a diff."""
  lines = []
  for key, value in golden.items():
    if isinstance(value, list) and value and isinstance(value[0], (list, str)):
      rows = ",\n    ".join(json.dumps(row, ensure_ascii=False) for row in value)
      lines.append(f'  {json.dumps(key)}: [\n    {rows}\n  ]')
    else:
      lines.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
  return "{\n" + ",\n".join(lines) + "\n}\n"


if __name__ == "__main__":
  sys.exit(main())
