"""The ``lm`` mode: a Llama-architecture language model trained here (or loaded), saved as a
Hugging Face checkpoint and measured the way users judge language models.

  1. The corpus: the running Python's standard library split by file
     (:func:`gkq_jax.job.data.text.stdlib_corpus`); the split's record goes to
     ``<workdir>/corpus_split.json``.
  2. The model: with ``config.checkpoint`` empty, a :class:`~gkq_jax.job.models.llama.Llama`
     of ``config.lm``'s size trained from scratch for ``lm.steps`` AdamW steps (warm-up, then
     cosine decay) on windows of the train split, byte-level tokens or a BPE trained on the
     train split; the training state is saved with orbax every ``config.checkpoint_every``
     steps (``<workdir>/checkpoints/lm``), so a killed run, rerun with the same workdir,
     resumes there and ends with the same weights. The trained model is written in Hugging
     Face layout to ``<workdir>/checkpoint`` (config.json, model.safetensors, tokenizer.json)
     and read back, its logits checked bit for bit against the trained model's, and the copy
     read back is what is measured. With ``config.checkpoint`` a folder or ``hf:owner/name``,
     that Llama checkpoint (and its tokenizer) is measured instead, nothing trained.
  3. The measures (:func:`measure_lm`, :func:`lm_throughput`): perplexity and bits per byte
     over the WHOLE validation and test splits (non-overlapping windows of ``lm.seq_len``
     tokens, :func:`gkq_jax.job.data.text.eval_windows`), and dense forward throughput in
     tokens per second at batch 1 and at ``lm.serving_batch`` on this machine.

The measuring functions take any model (an nnx module or a ``tokens -> logits`` callable), so
the compression modes score every stage with the same code.
"""

from __future__ import annotations

import math
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tokenizers
from absl import logging
from flax import nnx

from gkq_jax.job import report as report_lib
from gkq_jax.job.data import text as text_lib
from gkq_jax.job.data.images import DataError
from gkq_jax.job.models import hf, llama
from gkq_jax.job.modes import transformer
from gkq_jax.job.training import lm_metrics
from gkq_jax.job.training import train as train_lib

TOKENIZERS = ("byte", "bpe")
BOS_TOKEN = "<|startoftext|>"
EVAL_SPLITS = ("validation", "test")


# ------------------------------------------------------------------ checks


def check_config(config) -> None:
  """The ``lm`` settings, before any text is read or anything trains."""
  if config.mode != "lm":
    return
  if "lm" not in config:
    raise ValueError("config.mode='lm' needs the lm section of configs/llama.py; start from "
                     "that config.")
  c, m = config, config.lm
  if m.tokenizer not in TOKENIZERS:
    raise ValueError(f"lm.tokenizer={m.tokenizer!r} is not one of {TOKENIZERS}.")
  if m.tokenizer == "bpe" and m.bpe_vocab_size < 257:
    raise ValueError(f"lm.bpe_vocab_size={m.bpe_vocab_size} must be at least 257 (256 bytes "
                     "and the end-of-text token).")
  positive = {"lm.seq_len": m.seq_len, "batch_size": c.batch_size,
              "eval_batch_size": c.eval_batch_size, "lm.serving_batch": m.serving_batch,
              "lm.throughput_repeats": m.throughput_repeats, "log_every": c.log_every}
  if not c.checkpoint:
    positive.update({"lm.steps": m.steps, "lm.hidden_size": m.hidden_size,
                     "lm.intermediate_size": m.intermediate_size, "lm.num_layers": m.num_layers,
                     "lm.num_heads": m.num_heads, "lm.num_kv_heads": m.num_kv_heads})
  for name, value in positive.items():
    if value < 1:
      raise ValueError(f"{name}={value} must be >= 1.")
  for name, value in (("lm.warmup_steps", m.warmup_steps), ("lm.max_files", m.max_files),
                      ("checkpoint_every", c.checkpoint_every), ("lm.clip_norm", m.clip_norm)):
    if value < 0:
      raise ValueError(f"{name}={value} must be >= 0.")
  fractions = tuple(m.fractions)
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
    raise ValueError(f"lm.fractions={fractions} must be three non-negative numbers (train, "
                     "validation, test) that sum to 1, e.g. (0.9, 0.05, 0.05).")
  if not c.checkpoint:
    if m.hidden_size % m.num_heads or (m.hidden_size // m.num_heads) % 2:
      raise ValueError(f"lm.hidden_size={m.hidden_size} must be lm.num_heads={m.num_heads} "
                       "heads of an even size (rotary embeddings turn pairs).")
    if m.num_heads % m.num_kv_heads:
      raise ValueError(f"lm.num_heads={m.num_heads} must be a multiple of "
                       f"lm.num_kv_heads={m.num_kv_heads}.")
  transformer.check_checkpoint(c.checkpoint, "llama", "lm", required=False)


# --------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character map, the alphabet of ``tokenizers``' ByteLevel."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
               + list(range(ord("\xae"), ord("\xff") + 1)))
  chars, extra = {b: chr(b) for b in printable}, 0
  for b in range(256):
    if b not in chars:
      chars[b], extra = chr(256 + extra), extra + 1
  return chars


def byte_level_tokenizer() -> tokenizers.Tokenizer:
  """:class:`~gkq_jax.job.data.text.ByteTokenizer`'s ids as a ``tokenizers`` tokenizer, so a
  byte-level model's folder is a complete Hugging Face checkpoint: byte b is id b (a BPE with
  no merges over the ByteLevel alphabet), ``<|startoftext|>`` is 256, ``<|endoftext|>`` 257."""
  vocab = {char: b for b, char in _bytes_to_unicode().items()}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                          use_regex=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(BOS_TOKEN, special=True),
                          tokenizers.AddedToken(text_lib.EOS_TOKEN, special=True)])
  return tok


def _train_tokenizer(config, corpus: text_lib.Corpus, workdir: pathlib.Path):
  """(tokenizer for the corpus, tokenizers.Tokenizer for tokenizer.json, special ids). A BPE
  is trained once and kept in the workdir, so a resumed run tokenizes as the first did."""
  if config.lm.tokenizer == "byte":
    return text_lib.ByteTokenizer(), byte_level_tokenizer(), {
        "bos_token_id": text_lib.ByteTokenizer.BOS, "eos_token_id": text_lib.ByteTokenizer.EOS}
  path = workdir / "bpe_tokenizer.json"
  if path.is_file():
    bpe = text_lib.BpeTokenizer.load(path)
    if bpe.vocab_size != config.lm.bpe_vocab_size:
      raise ValueError(f"{path} has {bpe.vocab_size} ids, not lm.bpe_vocab_size="
                       f"{config.lm.bpe_vocab_size}: it is another run's; use a fresh workdir.")
  else:
    bpe = text_lib.train_bpe(corpus, config.lm.bpe_vocab_size)
    bpe.save(path)
  return bpe, bpe.tokenizer, {"bos_token_id": bpe.eos_id, "eos_token_id": bpe.eos_id}


def checkpoint_tokenizer(checkpoint: hf.Checkpoint) -> text_lib.BpeTokenizer:
  """A loaded checkpoint's tokenizer.json with the interface of the text module; the end of
  each file is the config's ``eos_token_id`` (none when it has none)."""
  tok = text_lib.BpeTokenizer(checkpoint.tokenizer, bos_token=None, eos_token=None)
  eos = checkpoint.config.get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) and eos else eos
  tok.eos_id = eos if isinstance(eos, int) else None
  return tok


# ------------------------------------------------------------------ measures


def logits_function(model) -> Callable[[Any], jax.Array]:
  """``tokens -> logits`` of an nnx model (jitted once) or of a callable as it is."""
  return transformer.jitted(model) if isinstance(model, nnx.Module) else model


def lm_eval_sets(corpus: text_lib.Corpus, tokenizer, splits: Sequence[str] = EVAL_SPLITS
                 ) -> dict[str, tuple[np.ndarray, int]]:
  """{split: (its whole token stream, its UTF-8 bytes)} for :func:`measure_lm`."""
  return {s: (text_lib.encode_split(corpus, s, tokenizer), corpus.num_bytes(s)) for s in splits}


def measure_lm(model, eval_sets: dict[str, tuple[np.ndarray, int]], seq_len: int,
               batch_size: int) -> dict[str, dict]:
  """Perplexity and bits per byte of ``model`` (nnx module or ``tokens -> logits``) over each
  whole split of ``eval_sets`` (:func:`lm_eval_sets`), in windows of ``seq_len`` tokens,
  ``batch_size`` windows a call: {split: :class:`lm_metrics.LmScores` as a dict}."""
  fn = logits_function(model)
  return {split: lm_metrics.perplexity(fn, text_lib.eval_windows(tokens, seq_len, batch_size),
                                       num_bytes).as_dict()
          for split, (tokens, num_bytes) in eval_sets.items()}


def lm_throughput(model, seq_len: int, batches: Sequence[int], repeats: int,
                  tokens: np.ndarray | None = None) -> list[dict]:
  """Dense forward throughput: tokens per second of one (batch, ``seq_len``) forward pass
  (the whole window scored at once, as for perplexity or a prompt; not token-by-token
  generation), the median of ``repeats`` timed calls after two untimed ones, per batch."""
  fn = logits_function(model)
  source = np.arange(256, dtype=np.int32) if tokens is None or not len(tokens) else tokens
  rows = []
  for batch in batches:
    inputs = jnp.asarray(np.resize(source, (batch, seq_len)).astype(np.int32))
    speed = lm_metrics.tokens_per_second(fn, inputs, batch * seq_len, repeats=repeats)
    rows.append({"batch": int(batch), "seq_len": int(seq_len),
                 "tokens_per_second": speed.tokens_per_second,
                 "seconds_per_call": float(np.median(speed.seconds))})
  return rows


# ------------------------------------------------------------------ training


def model_config(config, vocab_size: int) -> llama.LlamaConfig:
  m = config.lm
  return llama.LlamaConfig(
      vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads, rope_theta=float(m.rope_theta), rms_norm_eps=1e-5,
      max_position_embeddings=m.seq_len, tie_word_embeddings=bool(m.tie_embeddings))


def optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (b2 0.95; weight decay on matrices only) after global-norm clipping, on a linear
  warm-up to ``learning_rate`` then a cosine decay to ``lm.final_lr_ratio`` of it."""
  c, m = config, config.lm
  warmup = min(m.warmup_steps, m.steps - 1)
  end = c.learning_rate * m.final_lr_ratio
  schedule = (optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, warmup, m.steps, end)
              if warmup > 0 else optax.cosine_decay_schedule(c.learning_rate, m.steps,
                                                             m.final_lr_ratio))
  decay = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  adamw = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=c.weight_decay, mask=decay)
  return (optax.chain(optax.clip_by_global_norm(m.clip_norm), adamw) if m.clip_norm > 0
          else adamw), schedule


def _make_step(graphdef, rest, tx):
  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params, rest)(x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def _finite(pending: list, first_step: int) -> list[float]:
  values = [float(v) for v in pending]
  pending.clear()
  for i, v in enumerate(values):
    if not math.isfinite(v):
      raise train_lib.NonFiniteLossError(
          f"lm: the training loss became {v} at step {first_step + i}; lower the learning "
          "rate, e.g. --config.learning_rate=1e-3 (earlier checkpoints are kept).")
  return values


def steps_per_epoch(num_tokens: int, batch_size: int, seq_len: int) -> int:
  """Batches every epoch of :func:`text_lib.train_batches` holds, whatever its offset."""
  return max(0, (num_tokens - seq_len) // seq_len) // batch_size


def train(config, cfg: llama.LlamaConfig, tokens: np.ndarray, workdir: pathlib.Path,
          writer: report_lib.MetricWriter) -> tuple[llama.Llama, dict]:
  """``lm.steps`` steps from a fresh model (or from the newest checkpoint in
  ``workdir/checkpoints/lm``); returns the model and a record of the training."""
  c, m = config, config.lm
  per_epoch = steps_per_epoch(len(tokens), c.batch_size, m.seq_len)
  if per_epoch < 1:
    raise DataError(f"the train split holds {len(tokens)} tokens, too few for one batch of "
                    f"batch_size={c.batch_size} windows of lm.seq_len={m.seq_len}; lower them "
                    "or raise lm.max_files.")
  graphdef, params, rest = nnx.split(llama.create(cfg, seed=c.seed), nnx.Param, ...)
  tx, schedule = optimizer(config)
  leaves, treedef = jax.tree.flatten((params, tx.init(params)))
  directory = (workdir / "checkpoints" / "lm").resolve()
  try:
    done, leaves, position = train_lib.restore_latest(directory, leaves)
  except (ValueError, KeyError, TypeError) as error:  # another model's shapes or tree
    raise ValueError(f"{directory} holds the training state of another model ("
                     f"{type(error).__name__}); use a fresh workdir for this config.") from error
  done, recent = done or 0, (position or {}).get("train_loss")
  if done:
    logging.info("lm: resumed from the checkpoint of step %d", done)
  params, opt_state = jax.tree.unflatten(treedef, list(leaves))
  step_fn = _make_step(graphdef, rest, tx)
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
  pending, losses, start, epoch, batches = [], [], time.perf_counter(), None, None
  with ocp.CheckpointManager(directory, options=options) as manager:
    for step in range(done, m.steps):
      if step // per_epoch != epoch:
        epoch = step // per_epoch
        batches = text_lib.train_batches(tokens, c.batch_size, m.seq_len, c.seed, epoch,
                                         start=step % per_epoch)
      x, y = next(batches)
      params, opt_state, loss = step_fn(params, opt_state, x, y)
      pending.append(loss)
      last = step + 1 == m.steps
      if (step + 1) % c.log_every == 0 or last:
        values = _finite(pending, step + 1 - len(pending))
        losses += values
        rate = (step + 1 - done) / (time.perf_counter() - start)
        writer.write(stage="lm", step=step + 1, train_loss=float(np.mean(values)),
                     learning_rate=float(schedule(step)), steps_per_second=rate)
        logging.info("lm step %d/%d  loss %.4f  %.2f steps/s  ETA %dm%02ds", step + 1, m.steps,
                     np.mean(values), rate, *divmod(int((m.steps - step - 1) / rate), 60))
      if last or (c.checkpoint_every and (step + 1) % c.checkpoint_every == 0):
        losses += _finite(pending, step + 1 - len(pending))
        recent = float(np.mean(losses[-c.log_every:]))
        manager.save(step + 1, args=ocp.args.Composite(
            state=ocp.args.StandardSave(jax.tree.leaves((params, opt_state))),
            position=ocp.args.JsonSave({"step": step + 1, "train_loss": recent})))
    manager.wait_until_finished()
  seconds = time.perf_counter() - start
  record = {"steps": int(m.steps), "resumed_from_step": int(done),
            "batch_size": int(c.batch_size), "seq_len": int(m.seq_len),
            "tokens_seen": int(m.steps * c.batch_size * m.seq_len),
            "train_tokens": int(len(tokens)), "epochs": m.steps / per_epoch,
            "seconds_this_process": seconds,
            "final_train_loss": recent}  # mean of the last log_every steps
  return nnx.merge(graphdef, params, rest), record


def save_and_reload(model: llama.Llama, hf_config: dict, tokenizer: tokenizers.Tokenizer,
                    folder: pathlib.Path, sample: np.ndarray) -> hf.Checkpoint:
  """Writes ``model`` in Hugging Face layout and reads it back; the copy must give the
  trained model's logits on ``sample`` bit for bit (else ValueError)."""
  hf.save_checkpoint(model, hf_config, folder, tokenizer=tokenizer)
  loaded = hf.load_checkpoint(folder)
  inputs = jnp.asarray(sample)
  if not np.array_equal(np.asarray(transformer.jitted(model)(inputs)),
                        np.asarray(transformer.jitted(loaded.model)(inputs))):
    raise ValueError(f"the checkpoint written to {folder} does not give the trained model's "
                     "logits; it is not a faithful copy.")
  return loaded


# ---------------------------------------------------------------------- mode


def lm(config, workdir: pathlib.Path) -> dict:
  """Trains (or loads) the language model and measures it; returns the results."""
  c, m = config, config.lm
  corpus = text_lib.stdlib_corpus(c.seed, tuple(m.fractions), m.max_files or None)
  transformer.write_json(workdir, "corpus_split.json", corpus.record())
  training = None
  if c.checkpoint:
    loaded = transformer.load(c.checkpoint, "llama", "lm")
    limit = loaded.config.get("max_position_embeddings", m.seq_len)
    if m.seq_len > limit:
      raise ValueError(f"lm.seq_len={m.seq_len} is longer than the {limit} positions of "
                       f"{loaded.folder}; lower lm.seq_len.")
    tokenizer, source = checkpoint_tokenizer(loaded), str(loaded.folder)
  else:
    tokenizer, hf_tokenizer, special = _train_tokenizer(config, corpus, workdir)
    cfg = model_config(config, tokenizer.vocab_size)
    model, training = train(config, cfg, text_lib.encode_split(corpus, "train", tokenizer),
                            workdir, report_lib.MetricWriter(workdir))
    hf_config = {**cfg.to_hf(), **special, "torch_dtype": "float32"}
    sample = text_lib.encode_split(corpus, "validation", tokenizer)
    sample = np.resize(sample, (1, m.seq_len)).astype(np.int32)
    loaded = save_and_reload(model, hf_config, hf_tokenizer, workdir / "checkpoint", sample)
    source = "trained here"
  eval_sets = lm_eval_sets(corpus, tokenizer)
  vocab = loaded.model.config.vocab_size
  for split, (tokens, _) in eval_sets.items():
    if len(tokens) and int(tokens.max()) >= vocab:
      raise ValueError(f"the tokenizer gives id {int(tokens.max())} on the {split} split, "
                       f"beyond the model's vocab_size {vocab}.")
  logging.info("lm: measuring perplexity over %s", ", ".join(
      f"{s} ({len(t):,} tokens)" for s, (t, _) in eval_sets.items()))
  scores = measure_lm(loaded.model, eval_sets, m.seq_len, c.eval_batch_size)
  speed = lm_throughput(loaded.model, m.seq_len, sorted({1, m.serving_batch}),
                        m.throughput_repeats, eval_sets["validation"][0])
  results = {"mode": "lm", "model": "llama", "source": source,
             "checkpoint": str(loaded.folder), "parameters": transformer.parameter_count(
                 loaded.model),
             "tokenizer": c.lm.tokenizer if not c.checkpoint else "checkpoint's",
             "vocab_size": int(vocab), "seq_len": int(m.seq_len), "training": training,
             "lm": scores, "throughput": speed, "device": jax.devices()[0].device_kind}
  results["table"] = _table(scores, speed)
  logging.info("lm: %s", "; ".join(
      f"{s} perplexity {v['perplexity']:.4g}, {v['bits_per_byte']:.4g} bits/byte"
      for s, v in scores.items()))
  return results


def _table(scores: dict, speed: list[dict]) -> dict:
  """One row per split and measure, then one per throughput batch (values rounded for show;
  results.json keeps them whole)."""
  rows = []
  for split, s in scores.items():
    rows += [[split, "perplexity", round(s["perplexity"], 4)],
             [split, "bits per byte", round(s["bits_per_byte"], 4)],
             [split, "tokens scored", s["tokens"]]]
  for r in speed:
    rows.append([f"dense forward, batch {r['batch']} x {r['seq_len']} tokens", "tokens/s",
                 round(r["tokens_per_second"])])
  return {"columns": ["data", "measure", "value"], "rows": rows, "formats": {}}
