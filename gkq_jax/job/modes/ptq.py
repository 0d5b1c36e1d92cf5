"""The ``ptq`` mode: post-training compression of a pretrained transformer, every method side
by side on the same checkpoint, calibration data and evaluation data.

  1. The subject (:func:`lm_subject`, :func:`embedding_subject`): a Llama checkpoint measured
     by perplexity over the first ``ptq.eval_tokens`` tokens of the validation and test splits
     (:mod:`.lm`), or a BERT / sentence-transformers checkpoint measured on the code-search
     task (:mod:`.embeddings`: retrieval top-1, cosine to the fp32 embeddings). Calibration
     batches come from the train split / the task's calibration pairs, never from what is
     measured.
  2. The weights compressed: every matrix ``ptq.pattern`` selects (by default the Linear
     kernels; with ``ptq.embeddings`` the token embedding too, which a tied output matrix
     shares: it is one array, compressed once). Norms and biases stay in float.
  3. The methods (:data:`METHODS`), each at every ``ptq.bits`` (2**bits levels or entries per
     output channel unless said otherwise):
       rtn, rtn_mse    round to nearest per channel, min-max / MSE-clipped range
       rtn_g128        round to nearest per group of ``ptq.group_size`` input rows
       qwix_int8/int4  qwix's PTQ (its defaults: absmax scale per channel) on the same
                       nnx model; bits fixed by the type, so run once each
       kmeans          plain k-means per channel (no importance)
       gkq_abs         gkq per channel weighted by mean |g| (the seed's criterion)
       gkq_fisher      gkq per channel weighted by the Fisher diagonal mean g^2 (SqueezeLLM)
       gkq_fisher_g128 the same per group of ``ptq.group_size`` input rows
       gkq_fisher_sparse  gkq_fisher with ``ptq.sparse_fraction`` of each matrix (largest
                       h w^2) kept exactly in a sparse part (dense-and-sparse)
       gkq_fisher_alloc   per-layer codebooks, each layer's K (or ECSQ price) chosen by
                       optimal allocation so the selected weights take ``bits`` per weight
                       in the file, codebooks included
     The importance is computed once per kind over the calibration batches, streamed
     (:func:`gkq_jax.compute_importance`: one batch's gradients beside the running sum); its
     time is part of every row that uses it.
  4. Each row: the measures, bytes of the selected weights in the ``.gkq`` file (codebooks,
     coded indices and sparse part; qwix: its integer values and scales), bits per weight,
     and seconds to compress on this machine.

Nothing is chosen on the test split: the methods and their settings are fixed by the config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

import gkq_jax as gkq
from gkq_jax import error_feedback
from gkq_jax._paths import named_leaves
from gkq_jax.job.data import retrieval
from gkq_jax.job.data import text as text_lib
from gkq_jax.job.modes import embeddings as embeddings_lib
from gkq_jax.job.modes import lm as lm_lib
from gkq_jax.job.modes import transformer
from gkq_jax.job.training import lm_metrics

METHODS = ("rtn", "rtn_mse", "rtn_g128", "qwix_int8", "qwix_int4", "kmeans", "gkq_abs",
           "gkq_fisher", "gkq_fisher_g128", "gkq_fisher_sparse", "gkq_fisher_alloc",
           "gkq_act", "gkq_act_ef", "gkq_fisher_ef")
QWIX_BITS = {"qwix_int8": 8, "qwix_int4": 4}
IMPORTANCE_OF = {"gkq_abs": "abs_grad", "gkq_fisher": "grad_sq", "gkq_fisher_g128": "grad_sq",
                 "gkq_fisher_sparse": "grad_sq", "gkq_fisher_alloc": "grad_sq",
                 "gkq_act": "activation", "gkq_act_ef": "activation",
                 "gkq_fisher_ef": "grad_sq"}
# The packed runtime stores indices of 1..8 bits.
PACKED_BITS = range(1, 9)


@dataclasses.dataclass
class Subject:
  """What a table measures: the fp32 model and how to score, calibrate and quantize it."""

  model: nnx.Module
  measure: Callable[[nnx.Module], dict]  # model -> {measure: value}
  loss: Callable[[nnx.Module, Any], jax.Array]  # (model, calibration batch) -> scalar
  calibration: Callable[[], list]  # fresh list of calibration batches
  sample: tuple  # inputs of one call, for qwix to trace the model with
  qwix_method: str  # the method qwix intercepts
  key_measure: str  # the measure the log line shows


# ------------------------------------------------------------------ checks


def check_config(config) -> None:
  """The ``ptq`` settings, before any checkpoint or text is read."""
  if config.mode != "ptq":
    return
  if "ptq" not in config:
    raise ValueError("config.mode='ptq' needs the ptq section of configs/llama.py:ptq or "
                     "configs/minilm.py:ptq; start from one of those.")
  p = config.ptq
  unknown = sorted(set(p.methods) - set(METHODS))
  if unknown or not p.methods:
    raise ValueError(f"ptq.methods has {unknown or 'nothing'}; choose from {METHODS}.")
  for b in p.bits:
    if int(b) != b or int(b) not in PACKED_BITS:
      raise ValueError(f"ptq.bits has {b}: the packed runtime runs 1..8-bit indices; use "
                       "whole bits in 1..8.")
  if p.codebook_dtype not in ("float32", "float16"):
    raise ValueError(f"ptq.codebook_dtype={p.codebook_dtype!r} must be 'float32' or 'float16'.")
  if not 0 <= p.sparse_fraction < 1:
    raise ValueError(f"ptq.sparse_fraction={p.sparse_fraction} must be in [0, 1) (0.0045 keeps "
                     "0.45% of each matrix exactly).")
  for name in ("group_size", "calibration_batches", "calibration_batch_size"):
    if p[name] < 1:
      raise ValueError(f"ptq.{name}={p[name]} must be >= 1.")
  if config.model not in ("llama", "bert"):
    raise ValueError(f"config.model={config.model!r}: the ptq mode compresses 'llama' "
                     "(language model) or 'bert' (sentence embeddings) checkpoints.")
  transformer.check_checkpoint(config.checkpoint, config.model, "ptq", required=True)


def selected(params, rules) -> list[tuple[str, Any]]:
  """(path, leaf) of every leaf the rules compress."""
  return [(path, leaf) for path, leaf in named_leaves(params)
          if gkq.clusters_for(rules, path, leaf) > 0]


def group_sizes(params, rules, group_size: int) -> dict[str, int]:
  """{path: rows per group} of every selected matrix: ``group_size`` where it divides the
  matrix's input rows, else the largest divisor below it (the LM's down projection has 688
  rows: groups of 86), so every group of a matrix is the same size."""
  out = {}
  for path, leaf in selected(params, rules):
    rows = math.prod(jnp.shape(leaf)[:-1])
    out[path] = max(d for d in range(1, min(rows, group_size) + 1) if rows % d == 0)
    if out[path] != group_size:
      logging.info("ptq: %s has %d input rows; its groups are %d rows, the largest divisor "
                   "up to ptq.group_size=%d", path, rows, out[path], group_size)
  return out


def _by_group_size(quantize_fn, params, rules, group_size: int):
  """``quantize_fn(params, rules, group_size)`` run once per distinct group size of
  :func:`group_sizes`, each run selecting its own matrices; the trees merged."""
  sizes = group_sizes(params, rules, group_size)
  tree = params
  for size in sorted(set(sizes.values())):
    paths = [p for p, g in sizes.items() if g == size]
    only = [gkq.ClusterRule("^(?:" + "|".join(re.escape(p) for p in paths) + ")$",
                            rules[0].num_clusters)]
    part = quantize_fn(params, only, size)
    tree = jax.tree.map(lambda old, new: new if gkq.is_clustered(new) else old, tree, part,
                        is_leaf=gkq.is_clustered)
  return tree


# ---------------------------------------------------------------- subjects


def lm_loss(model, tokens) -> jax.Array:
  """Mean next-token cross-entropy of a (batch, length + 1) window."""
  logits = model(tokens[:, :-1]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def calibration_windows(tokens: np.ndarray, count: int, batch: int, length: int, seed: int
                        ) -> list[np.ndarray]:
  """``count`` batches of ``batch`` windows of ``length`` tokens at seeded offsets."""
  if len(tokens) <= length:
    raise ValueError(f"the calibration text has {len(tokens)} tokens, fewer than one window "
                     f"of {length}; use more files or a shorter ptq.calibration_length.")
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(tokens) - length, size=(count, batch))
  return [np.stack([tokens[s:s + length] for s in row]).astype(np.int32) for row in starts]


def lm_subject(config) -> Subject:
  """The Llama of ``config.checkpoint`` on the standard-library corpus split by file."""
  p, m = config.ptq, config.lm
  loaded = transformer.load(config.checkpoint, "llama", "ptq")
  corpus = text_lib.stdlib_corpus(config.seed, tuple(m.fractions), m.max_files or None)
  tokenizer = lm_lib.checkpoint_tokenizer(loaded)
  vocab = loaded.model.config.vocab_size
  splits = {s: text_lib.encode_split(corpus, s, tokenizer) for s in ("train", *lm_lib.EVAL_SPLITS)}
  for split, tokens in splits.items():
    if len(tokens) and int(tokens.max()) >= vocab:
      raise ValueError(f"the checkpoint's tokenizer gives id {int(tokens.max())} on the {split} "
                       f"split, beyond the model's vocab_size {vocab}: tokenizer.json and "
                       "the weights do not belong together.")
  eval_sets = {}
  for split in lm_lib.EVAL_SPLITS:
    tokens = splits[split][:p.eval_tokens] if p.eval_tokens else splits[split]
    # Bits per byte over a prefix: its share of the split's bytes, by tokens.
    share = len(tokens) / max(len(splits[split]), 1)
    eval_sets[split] = (tokens, max(1, round(corpus.num_bytes(split) * share)))
  windows = lambda: [jnp.asarray(w) for w in calibration_windows(
      splits["train"], p.calibration_batches, p.calibration_batch_size, m.seq_len + 1,
      config.seed)]

  def measure(model):
    scores = lm_lib.measure_lm(model, eval_sets, m.seq_len, config.eval_batch_size)
    return {f"{s}_{k}": v[k] for s, v in scores.items() for k in ("perplexity", "bits_per_byte")}

  sample = (jnp.asarray(splits["validation"][None, :m.seq_len].astype(np.int32)),)
  return Subject(loaded.model, measure, lm_loss, windows, sample, "__call__",
                 "validation_perplexity")


def contrastive_loss(model, batch, temperature: float = 0.05) -> jax.Array:
  """In-batch InfoNCE of queries against their documents (the retrieval task's loss)."""
  q = model.embed(batch["query_ids"], batch["query_mask"])
  d = model.embed(batch["doc_ids"], batch["doc_mask"])
  logits = (q @ d.T) / temperature
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.arange(logits.shape[0])).mean()


def embedding_subject(config) -> Subject:
  """The BERT checkpoint of ``config.checkpoint`` on the code-search task."""
  p, e = config.ptq, config.embeddings
  loaded = transformer.load(config.checkpoint, "bert", "ptq")
  task = retrieval.code_search_task(config.seed, e.calibration_size, e.evaluation_size,
                                    e.max_files or None)
  if len(task.calibration) < p.calibration_batch_size:
    raise ValueError(f"the task has {len(task.calibration)} calibration pairs, fewer than "
                     f"ptq.calibration_batch_size={p.calibration_batch_size}.")
  texts, max_length = embeddings_lib.pair_texts(task.evaluation), e.max_length or None
  reference = embeddings_lib.embed_pairs(loaded.model, loaded.tokenize, texts, e.batch_size,
                                         max_length)
  width = p.calibration_length

  def batches():
    pairs, out = task.calibration, []
    size = p.calibration_batch_size
    for start in range(0, min(len(pairs), size * p.calibration_batches) - size + 1, size):
      chunk = pairs[start:start + size]
      q_ids, q_mask = loaded.tokenize([x.query for x in chunk], width)
      d_ids, d_mask = loaded.tokenize([x.document for x in chunk], width)
      pad = lambda a: jnp.asarray(np.pad(a, ((0, 0), (0, width - a.shape[1]))))
      out.append({"query_ids": pad(q_ids), "query_mask": pad(q_mask),
                  "doc_ids": pad(d_ids), "doc_mask": pad(d_mask)})
    return out

  def measure(model):
    return embeddings_lib.measure_embeddings(model, reference, texts, loaded.tokenize,
                                             e.batch_size, e.neighbours, max_length)

  ids, mask = loaded.tokenize(texts["queries"][:2], 32)
  return Subject(loaded.model, measure, contrastive_loss, batches,
                 (jnp.asarray(ids), jnp.asarray(mask)), "embed", "retrieval_top1")


# ---------------------------------------------------------------- compressing


@dataclasses.dataclass
class Compressed:
  """One method's model and what it cost."""

  model: nnx.Module
  weight_bytes: int  # bytes of the selected weights as stored
  weights: int  # how many weights that is
  seconds: float
  tree: Any = None  # the compressed Params (ClusteredArray leaves); None for qwix


def _with_params(model: nnx.Module, params) -> nnx.Module:
  copy = nnx.clone(model)
  nnx.update(copy, params)
  return copy


def _clustered_bytes(tree) -> int:
  return sum(gkq.stored_bytes(leaf) for _, leaf in gkq.clustered_leaves(tree))


def _gkq_tree(method: str, bits: int, params, importance, rules, p):
  """The quantized tree of one gkq / k-means / RTN method."""
  if method == "rtn":
    return gkq.rtn_quantize(params, bits, rules)
  if method == "rtn_mse":
    return gkq.rtn_quantize(params, bits, rules, clip="mse")
  if method == "rtn_g128":
    return _by_group_size(lambda ps, rs, g: gkq.rtn_quantize(ps, bits, rs, group_size=g),
                          params, rules, p.group_size)
  if method == "gkq_fisher_alloc":
    weights = sum(int(np.size(x)) for _, x in selected(params, rules))
    return gkq.quantize(params, importance, rules, budget_bytes=bits * weights / 8,
                        methods=("kmeans",), clusters=tuple(2 ** b for b in range(1, 9)))
  options = {"granularity": "channel"}
  if method == "gkq_fisher_g128":
    return _by_group_size(lambda ps, rs, g: gkq.quantize(ps, importance, rs, group_size=g,
                                                         **options), params, rules, p.group_size)
  if method == "gkq_fisher_sparse":
    options["sparse_fraction"] = p.sparse_fraction
  return gkq.quantize(params, None if method == "kmeans" else importance, rules, **options)


def _with_error_feedback(tree, params, moments: dict, rounds: int):
  """Every clustered Linear kernel, ``rounds`` times: indices re-chosen with GPTQ's error
  feedback (:func:`gkq_jax.error_feedback.error_feedback_indices`), then its codebooks refit
  to those indices (:func:`gkq_jax.error_feedback.refit_codebooks`; per channel or per
  layer, not per group)."""
  weights = dict(named_leaves(params))
  feedback = jax.jit(error_feedback.error_feedback_indices)
  refit = jax.jit(error_feedback.refit_codebooks)
  out = []
  for path, leaf in named_leaves(tree, is_leaf=gkq.is_clustered):
    module = path.rsplit("/", 1)[0]
    if gkq.is_clustered(leaf) and module in moments and jnp.ndim(weights[path]) == 2:
      h = jnp.asarray(moments[module], jnp.float32)
      for _ in range(rounds):
        leaf = feedback(weights[path], leaf, h)
        if leaf.codebook.ndim == 2 and leaf.sparse is None:
          leaf = refit(weights[path], leaf, h)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(tree, is_leaf=gkq.is_clustered), out)


def _codebooks_as(tree, dtype: str):
  """Every codebook rounded to ``dtype`` ("float16": two bytes an entry in the file, as
  LUT kernels hold their tables; "float32": as fitted)."""
  if dtype == "float32":
    return tree
  cast = lambda leaf: (leaf.replace(codebook=jnp.asarray(leaf.codebook, dtype).astype(
      jnp.float32)) if gkq.is_clustered(leaf) else leaf)
  return jax.tree.map(cast, tree, is_leaf=gkq.is_clustered)


def _qwix(subject: Subject, method: str) -> Compressed:
  import qwix  # the job's peer to compare with (the compare extra); imported when asked for

  start = time.perf_counter()
  rule = qwix.QuantizationRule(module_path=".*", weight_qtype=f"int{QWIX_BITS[method]}")
  model = qwix.quantize_model(subject.model, qwix.PtqProvider([rule]), *subject.sample,
                              methods=(subject.qwix_method,))
  seconds = time.perf_counter() - start
  # qwix's state holds each quantized kernel as .../kernel/array/{qvalue, scale}.
  nbits, weights = 0, 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if "/array/qvalue" in name:
      weights += leaf.size
      nbits += leaf.size * QWIX_BITS[method]
    elif "/array/scale" in name or "/array/zero_point" in name:
      nbits += leaf.size * 8 * leaf.dtype.itemsize
  return Compressed(model, math.ceil(nbits / 8), weights, seconds)


def compress(subject: Subject, method: str, bits: int, rules, importances: dict,
             p) -> Compressed:
  """``subject``'s model compressed by ``method`` at ``bits``."""
  if method in QWIX_BITS:
    return _qwix(subject, method)
  params = nnx.state(subject.model, nnx.Param)
  found = importances.get(IMPORTANCE_OF.get(method))
  importance = None if found is None else nnx.filter_state(found.values, nnx.Param)
  seconds = 0.0 if found is None else found.seconds
  start = time.perf_counter()
  tree = _gkq_tree(method, bits, params, importance, rules, p)
  if method.endswith("_ef"):
    activation = importances["activation"]
    seconds += activation.seconds if found is not activation else 0.0
    tree = _with_error_feedback(tree, params, activation.moments, p.feedback_rounds)
  if not method.startswith("rtn"):  # RTN's grids are two numbers a row already
    tree = _codebooks_as(tree, p.codebook_dtype)
  dense = gkq.dequantize(tree)
  jax.block_until_ready(dense)
  seconds += time.perf_counter() - start
  weights = sum(int(np.size(x)) for _, x in selected(params, rules))
  return Compressed(_with_params(subject.model, dense), _clustered_bytes(tree), weights,
                    seconds, tree)


_gram = jax.jit(lambda x: x.T @ x)


def input_moments(model: nnx.Module, forward: Callable, batches) -> dict[str, np.ndarray]:
  """{module path: E[x x^T], (inputs, inputs)} of every ``nnx.Linear`` of ``model`` over
  ``forward(model, batch)`` of the batches (run eagerly: the inputs are read as the layers
  see them)."""
  names = {id(m): "/".join(map(str, path)) for path, m in model.iter_modules()
           if isinstance(m, nnx.Linear)}
  sums: dict[str, list] = {}
  original = nnx.Linear.__call__

  def recording(self, x):
    name = names.get(id(self))
    if name is not None:
      # float32 on the accelerator (a BERT's 1536-wide inputs over 10^5 tokens are
      # 10^11 multiply-adds a batch set); the float64 sum of the batches on the host.
      flat = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
      total = sums.setdefault(name, [0.0, 0])
      total[0] = total[0] + np.asarray(_gram(flat), np.float64)
      total[1] += flat.shape[0]
    return original(self, x)

  nnx.Linear.__call__ = recording
  try:
    for batch in batches:
      forward(model, batch)
  finally:
    nnx.Linear.__call__ = original
  return {name: (total / count).astype(np.float32) for name, (total, count) in sums.items()}


def activation_importance(model: nnx.Module, moments: dict[str, np.ndarray]):
  """Importance of each Linear kernel weight w_ij as its input's second moment E[x_i^2]:
  the diagonal of the layer's output-error Hessian (what GPTQ's and any4's objectives weigh
  a weight's error by), as an nnx state shaped like the Params (ones for other leaves)."""
  diagonals = {k: np.diagonal(v) for k, v in moments.items()}
  flat = []
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    module = "/".join(map(str, path[:-1]))
    shape = variable.get_value().shape
    value = (np.broadcast_to(diagonals[module][:, None], shape)
             if path[-1] == "kernel" and module in diagonals else np.ones(shape, np.float32))
    flat.append((path, variable.replace(jnp.asarray(value))))
  return nnx.State.from_flat_path(flat)


@dataclasses.dataclass
class Importance:
  """One kind of importance over the calibration batches and what it took."""

  values: Any  # an nnx state like the Params
  seconds: float
  moments: dict | None = None  # "activation": each Linear's E[x x^T], for error feedback


def importance_for(subject: Subject, kind: str) -> Importance:
  """``kind`` ("abs_grad", "grad_sq" or "activation") over the calibration batches."""
  start = time.perf_counter()
  moments = None
  if kind == "activation":
    moments = input_moments(subject.model, subject.loss, subject.calibration())
    imp = activation_importance(subject.model, moments)
  else:
    imp = gkq.compute_importance(subject.loss, subject.model, subject.calibration(), kind=kind)
  jax.block_until_ready(jax.tree.leaves(imp))
  return Importance(imp, time.perf_counter() - start, moments)


def add_importances(subject: Subject, methods, importances: dict) -> dict:
  """``importances`` with every kind ``methods`` need added (error feedback needs the
  activations' moments too); kinds already there are not computed again."""
  kinds = {IMPORTANCE_OF[m] for m in methods if m in IMPORTANCE_OF}
  kinds |= {"activation"} if any(m.endswith("_ef") for m in methods) else set()
  for kind in sorted(kinds - set(importances)):
    importances[kind] = importance_for(subject, kind)
  return importances


def rules_for(p, bits: int) -> list:
  pattern = p.pattern if not p.embeddings else f"(?:{p.pattern})|embedding$"
  return [gkq.bits_rule(pattern, bits)]


def run_table(subject: Subject, p, rows_file: pathlib.Path | None = None,
              log: Callable[[str], None] = logging.info,
              importances: dict | None = None) -> dict:
  """Every method of ``p.methods`` at every ``p.bits``: {"fp32": measures, "rows": [...]}.
  Each finished row is appended to ``rows_file`` (JSON lines); a rerun with the same file
  keeps the rows already there and computes only the others. The importances computed
  are added to ``importances`` (when given), for the caller to reuse."""
  done_rows = {}
  if rows_file is not None and rows_file.exists():
    for line in rows_file.read_text().splitlines():
      row = json.loads(line)
      done_rows[row["method"], row["bits"]] = row
    log(f"ptq: {len(done_rows)} rows already in {rows_file}; computing the others")
  fp32 = subject.measure(subject.model)
  wanted = [(m, int(b)) for m in p.methods
            for b in ([QWIX_BITS[m]] if m in QWIX_BITS else p.bits)]
  todo = [m for m, b in wanted if (m, b) not in done_rows]
  importances = add_importances(subject, todo, {} if importances is None else importances)
  rows = []
  for method, bits in wanted:
    if (method, bits) in done_rows:
      rows.append(done_rows[method, bits])
      continue
    done = compress(subject, method, bits, rules_for(p, bits), importances, p)
    scores = subject.measure(done.model)
    row = {"method": method, "bits": bits, **scores, "weight_bytes": done.weight_bytes,
           "weights": done.weights, "bits_per_weight": 8 * done.weight_bytes / max(done.weights, 1),
           "seconds": done.seconds}
    rows.append(row)
    if rows_file is not None:
      with rows_file.open("a") as f:
        f.write(json.dumps(row) + "\n")
    log(f"ptq {method} {bits} bits: {subject.key_measure} {scores[subject.key_measure]:.4f} "
        f"(fp32 {fp32[subject.key_measure]:.4f}), {row['bits_per_weight']:.2f} bits/weight, "
        f"{done.seconds:.1f} s")
  return {"fp32": fp32, "rows": rows}


def packed_speed(subject: Subject, done: Compressed, repeats: int = 5) -> dict:
  """Batch-1 forward speed of ``done``'s model run from its packed weights
  (:func:`gkq_jax.merge_packed`) beside the same model run dense, timed alternately in one
  run, and the largest difference between their outputs."""
  graphdef, _, rest = nnx.split(done.model, nnx.Param, ...)
  packed = gkq.merge_packed(graphdef, gkq.pack_tree(done.tree), rest)
  dense_fn = transformer.jitted(done.model, subject.qwix_method)
  packed_fn = transformer.jitted(packed, subject.qwix_method)
  out = {"max_abs_difference": float(np.max(np.abs(
      np.asarray(dense_fn(*subject.sample), np.float32)
      - np.asarray(packed_fn(*subject.sample), np.float32))))}
  tokens = int(np.size(subject.sample[0]))
  for name, fn in (("dense", dense_fn), ("packed", packed_fn), ("dense_again", dense_fn)):
    speed = lm_metrics.tokens_per_second(lambda x: fn(*x), subject.sample, tokens,
                                         repeats=repeats)
    out[f"{name}_tokens_per_second"] = speed.tokens_per_second
  return out


def ptq(config, workdir) -> dict:
  """The mode: the table of :func:`run_table` for the configured checkpoint."""
  subject = lm_subject(config) if config.model == "llama" else embedding_subject(config)
  importances = {}  # calibration is the costly part: computed once for both uses
  table = run_table(subject, config.ptq, pathlib.Path(workdir) / "ptq_rows.jsonl",
                    importances=importances)
  if config.ptq.packed_method:
    method, bits = config.ptq.packed_method, int(config.ptq.packed_bits)
    add_importances(subject, [method], importances)
    done = compress(subject, method, bits, rules_for(config.ptq, bits), importances,
                    config.ptq)
    table["packed"] = {"method": method, "bits": bits, **packed_speed(subject, done)}
    logging.info("ptq packed: %s", table["packed"])
  results = {"mode": "ptq", "model": config.model, "checkpoint": config.checkpoint,
             "parameters": transformer.parameter_count(subject.model),
             "ptq": {k: (list(v) if isinstance(v, (tuple, list)) else v)
                     for k, v in config.ptq.items()},
             **table, "device": jax.devices()[0].device_kind}
  results["table"] = _table(table, subject.key_measure)
  return results


def _table(table: dict, key: str) -> dict:
  """fp32, then one row per method and bits (rounded for show; results.json keeps them
  whole), with the key measure's change from fp32 in percent."""
  fp32 = table["fp32"]
  measures = [k for k in fp32 if isinstance(fp32[k], float)]
  change = lambda r: round(100 * (r[key] - fp32[key]) / fp32[key], 2)
  rows = [["fp32", 32, *[round(fp32[k], 4) for k in measures], 0.0, None, 32.0, None]]
  for r in table["rows"]:
    rows.append([r["method"], r["bits"], *[round(r[k], 4) for k in measures], change(r),
                 r["weight_bytes"], round(r["bits_per_weight"], 3), round(r["seconds"], 1)])
  return {"columns": ["method", "bits", *measures, f"{key} change %", "weight bytes",
                      "bits/weight", "seconds"], "rows": rows, "formats": {}}
