"""The ``embeddings`` mode: a sentence-embedding checkpoint (BERT family, e.g. all-MiniLM-L6-v2)
measured the way users judge it.

  1. The model: ``config.checkpoint``, a Hugging Face / sentence-transformers folder or
     ``hf:owner/name`` (:func:`gkq_jax.job.models.hf.load_checkpoint`), weights as stored.
  2. The task: code search from the running Python's standard library
     (:func:`gkq_jax.job.data.retrieval.code_search_task`): a function's docstring is the query,
     its ``def`` line the one right document; ``embeddings.calibration_size`` pairs for the
     compression modes to calibrate on, ``embeddings.evaluation_size`` pairs from other files
     to measure on; the task's record goes to ``<workdir>/retrieval_task.json``.
  3. The measures (:func:`measure_embeddings`): retrieval top-1 accuracy and MRR (each query
     against all evaluation documents), and, against reference embeddings (the fp32 model's),
     the mean cosine and the top-``embeddings.neighbours`` neighbour overlap over the queries
     and documents together; for the fp32 model itself these are 1 by construction. Then
     :func:`sentence_throughput`: sentences per second of the dense forward over the first
     ``embeddings.serving_batch`` queries, one at a time and all in one batch, on this machine.

:func:`embed_texts` and :func:`measure_embeddings` take any model with the checkpoint's
``embed(ids, mask)`` (or such a callable), so the compression modes score every stage alike.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from gkq_jax.job.data import retrieval
from gkq_jax.job.modes import transformer
from gkq_jax.job.training import lm_metrics

PARTS = ("queries", "documents")
_ROUND = 16  # batches are padded to a multiple of this many tokens: few shapes to compile


def check_config(config) -> None:
  """The ``embeddings`` settings, before any text is read or any model loads."""
  if config.mode != "embeddings":
    return
  if "embeddings" not in config:
    raise ValueError("config.mode='embeddings' needs the embeddings section of "
                     "configs/minilm.py; start from that config.")
  e = config.embeddings
  for name, value in (("embeddings.evaluation_size", e.evaluation_size),
                      ("embeddings.batch_size", e.batch_size),
                      ("embeddings.serving_batch", e.serving_batch),
                      ("embeddings.neighbours", e.neighbours),
                      ("embeddings.throughput_repeats", e.throughput_repeats)):
    if value < 1:
      raise ValueError(f"{name}={value} must be >= 1.")
  for name, value in (("embeddings.calibration_size", e.calibration_size),
                      ("embeddings.max_files", e.max_files),
                      ("embeddings.max_length", e.max_length)):
    if value < 0:
      raise ValueError(f"{name}={value} must be >= 0.")
  if e.neighbours >= 2 * e.evaluation_size:
    raise ValueError(f"embeddings.neighbours={e.neighbours} must be below the "
                     f"{2 * e.evaluation_size} evaluation texts (queries and documents).")
  transformer.check_checkpoint(config.checkpoint, "bert", "embeddings", required=True)


def pair_texts(pairs: Sequence[retrieval.Pair]) -> dict[str, list[str]]:
  """{"queries": docstrings, "documents": def lines}; query i belongs with document i."""
  return {"queries": [p.query for p in pairs], "documents": [p.document for p in pairs]}


def embedding_function(model) -> Callable:
  """``(ids, mask) -> embeddings`` of an nnx model's ``embed`` (jitted once) or a callable."""
  return transformer.jitted(model, "embed") if isinstance(model, nnx.Module) else model


def embed_texts(model, tokenize: Callable, texts: Sequence[str], batch_size: int,
                max_length: int | None = None) -> np.ndarray:
  """(n, d) float32 embeddings of ``texts``: tokenized with ``tokenize(texts, max_length) ->
  (ids, mask)`` (:meth:`gkq_jax.job.models.hf.Checkpoint.tokenize`), batched by length (each
  batch padded to a multiple of 16 tokens and to ``batch_size`` rows, so few shapes compile;
  padding never changes a row's embedding: masked keys take no part in attention)."""
  fn = embedding_function(model)
  ids, mask = tokenize(list(texts), max_length)
  lengths = mask.sum(1)
  order = np.argsort(-lengths, kind="stable")
  out = None
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    width = min(ids.shape[1], -(-int(lengths[rows].max()) // _ROUND) * _ROUND)
    take = np.resize(rows, batch_size)  # the last batch: its rows repeated, cut off below
    got = np.asarray(fn(jnp.asarray(ids[take, :width]), jnp.asarray(mask[take, :width])),
                     np.float32)[:len(rows)]
    out = np.zeros((len(order), got.shape[1]), np.float32) if out is None else out
    out[rows] = got
  return out


def embed_pairs(model, tokenize: Callable, texts: dict[str, list[str]], batch_size: int,
                max_length: int | None = None) -> dict[str, np.ndarray]:
  """{"queries": (n, d), "documents": (n, d)} embeddings of :func:`pair_texts`."""
  return {part: embed_texts(model, tokenize, texts[part], batch_size, max_length)
          for part in PARTS}


def embedding_scores(reference: dict[str, np.ndarray], embeddings: dict[str, np.ndarray],
                     neighbours: int = 10) -> dict:
  """Retrieval top-1 / MRR of ``embeddings``, and its mean cosine and neighbour overlap with
  ``reference`` over queries and documents together."""
  ref = np.concatenate([reference[p] for p in PARTS])
  got = np.concatenate([embeddings[p] for p in PARTS])
  found = lm_metrics.retrieval_scores(embeddings["queries"], embeddings["documents"])
  return {"retrieval_top1": found["top1"], "retrieval_mrr": found["mrr"], "pairs": found["n"],
          "mean_cosine": lm_metrics.mean_cosine(ref, got),
          "neighbour_overlap": lm_metrics.topk_overlap(ref, got, neighbours),
          "neighbours": int(neighbours)}


def measure_embeddings(model, reference_embeddings: dict[str, np.ndarray],
                       texts: dict[str, list[str]], tokenize: Callable, batch_size: int = 64,
                       neighbours: int = 10, max_length: int | None = None) -> dict:
  """The full measure set of ``model`` (any model with ``embed``, e.g. a compressed copy) on
  the evaluation ``texts`` (:func:`pair_texts`), against ``reference_embeddings`` (the fp32
  model's :func:`embed_pairs`): see :func:`embedding_scores`."""
  return embedding_scores(reference_embeddings,
                          embed_pairs(model, tokenize, texts, batch_size, max_length), neighbours)


def sentence_throughput(model, tokenize: Callable, texts: Sequence[str], batches: Sequence[int],
                        repeats: int, max_length: int | None = None) -> list[dict]:
  """Sentences per second of the dense embedding forward (tokenization not included) on the
  same sentences at every batch size: the first ``max(batches)`` of ``texts`` in consecutive
  batches of ``batch``, each padded to its longest (batch 1: every sentence at its own
  length). A timed call embeds them all; the median of ``repeats`` calls after two untimed
  ones (which compile every shape)."""
  fn = embedding_function(model)
  chosen = [str(t) for t in np.resize(np.asarray(list(texts), object), max(batches))]
  rows = []
  for batch in batches:
    chunks = [tuple(map(jnp.asarray, tokenize(chosen[i:i + batch], max_length)))
              for i in range(0, len(chosen), batch)]
    speed = lm_metrics.tokens_per_second(lambda parts: [fn(*p) for p in parts], chunks,
                                         len(chosen), repeats=repeats)
    rows.append({"batch": int(batch), "sentences": len(chosen),
                 "tokens": int(sum(int(mask.sum()) for _, mask in chunks)),
                 "padded_tokens": int(sum(mask.size for _, mask in chunks)),
                 "sentences_per_second": speed.tokens_per_second,
                 "seconds_per_sentence": float(np.median(speed.seconds)) / len(chosen)})
  return rows


def embeddings(config, workdir: pathlib.Path) -> dict:
  """Loads the checkpoint, builds the retrieval task and measures; returns the results."""
  e = config.embeddings
  checkpoint = transformer.load(config.checkpoint, "bert", "embeddings")
  task = retrieval.code_search_task(config.seed, e.calibration_size, e.evaluation_size,
                                    e.max_files or None)
  transformer.write_json(workdir, "retrieval_task.json", task.record())
  texts, max_length = pair_texts(task.evaluation), e.max_length or None
  logging.info("embeddings: %d evaluation pairs from %s", len(task.evaluation),
               checkpoint.folder)
  reference = embed_pairs(checkpoint.model, checkpoint.tokenize, texts, e.batch_size,
                          max_length)
  scores = embedding_scores(reference, reference, e.neighbours)
  speed = sentence_throughput(checkpoint.model, checkpoint.tokenize, texts["queries"],
                              sorted({1, e.serving_batch}), e.throughput_repeats, max_length)
  pooling = checkpoint.pooling
  results = {"mode": "embeddings", "model": "bert", "checkpoint": str(checkpoint.folder),
             "parameters": transformer.parameter_count(checkpoint.model),
             "pooling": None if pooling is None else {
                 "mode": pooling.mode, "normalize": pooling.normalize,
                 "max_seq_length": pooling.max_seq_length},
             "task": {"calibration_pairs": len(task.calibration),
                      "evaluation_pairs": len(task.evaluation),
                      "available_pairs": task.available},
             "embeddings": scores, "throughput": speed}
  results["table"] = _table(scores, speed)
  logging.info("embeddings: retrieval top-1 %.4f, MRR %.4f over %d pairs",
               scores["retrieval_top1"], scores["retrieval_mrr"], scores["pairs"])
  return results


def _table(scores: dict, speed: list[dict]) -> dict:
  """Retrieval rows, then one row per throughput batch (rounded for show)."""
  pairs = f"code search, {scores['pairs']} evaluation pairs"
  rows = [[pairs, "retrieval top-1", round(scores["retrieval_top1"], 4)],
          [pairs, "retrieval MRR", round(scores["retrieval_mrr"], 4)]]
  for r in speed:
    rows.append([f"dense forward, batch {r['batch']} ({r['sentences']} queries, "
                 f"{r['padded_tokens']} tokens padded)", "sentences/s",
                 round(r["sentences_per_second"], 1)])
  return {"columns": ["data", "measure", "value"], "rows": rows, "formats": {}}
