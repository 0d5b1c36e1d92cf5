"""The command-line job's entry: data, model, baseline, then the mode.

``main.py`` parses flags and calls :func:`run`; everything here takes a config
and a workdir, so tests drive the same code on tiny data.

Modes (:mod:`gkq_jax.job.modes`): ``train`` (baseline only), ``compress`` (the
full pipeline, default), ``sensitivity`` and ``compare``, ``equal_bytes``,
``survey``; for transformers (:data:`TRANSFORMER_MODES`, their own text data and
Hugging Face checkpoints, called as ``mode(config, workdir)``): ``lm``
(configs/llama.py) and ``embeddings`` (configs/minilm.py). Every setting is
checked before anything trains: what needs no data by :func:`check_config`,
what needs the model by :func:`check_model`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from gkq_jax.job import context, models
from gkq_jax.job import report as report_lib
from gkq_jax.job.data import images as data_lib
from gkq_jax.job.data import streaming
from gkq_jax.job.modes import compress as pipeline
from gkq_jax.job.modes import (
  dkm_stage,
  embeddings,
  equal_bytes,
  lm,
  ptq,
  qat_stage,
  studies,
  survey,
)
from gkq_jax.job.training import train as train_lib

MODES = {
    "train": lambda ctx, state, results: results,
    "compress": pipeline.compress,
    "sensitivity": studies.sensitivity,
    "compare": studies.compare,
    "equal_bytes": equal_bytes.equal_bytes,
    "survey": survey.survey,
    "lm": lm.lm,
    "embeddings": embeddings.embeddings,
    "ptq": ptq.ptq,
}
TRANSFORMER_MODES = ("lm", "embeddings", "ptq")  # mode(config, workdir) -> results: no image data


def prepare_workdir(workdir) -> pathlib.Path:
  path = pathlib.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".write_test"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"workdir {path} cannot be written ({e.strerror}); pass "
                     "--workdir=<a folder you can write>.") from None
  return path


def restore_init_checkpoint(path: str, state: train_lib.TrainState) -> train_lib.TrainState:
  """Weights (and batch statistics) from another run's checkpoint folder."""
  folder = pathlib.Path(path).resolve()
  if not folder.exists():
    raise ValueError(f"init_checkpoint {folder} does not exist.")
  with ocp.CheckpointManager(folder) as manager:
    step = manager.latest_step()
    if step is None:
      raise ValueError(f"init_checkpoint {folder} holds no checkpoint; point it at a folder "
                       "such as runs/<name>/checkpoints/baseline.")
    raw = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state
  restored = {"params": raw.get("params"), "batch_stats": raw.get("batch_stats")}
  expected = {"params": state.params, "batch_stats": state.batch_stats}
  shapes = lambda t: jax.tree.map(lambda x: tuple(np.shape(x)), t)
  try:
    same = shapes(restored) == shapes(expected)
  except Exception:  # noqa: BLE001 - different structures
    same = False
  if not same:
    raise ValueError(f"init_checkpoint {folder} is of another model (its parameter tree or "
                     "shapes differ from this config's model); use the config that wrote it.")
  return state.replace(params=jax.tree.map(np.asarray, restored["params"]),
                       batch_stats=jax.tree.map(np.asarray, restored["batch_stats"]))


def load_data(config):
  """The config's dataset: in memory, or streamed through grain (``config.stream``),
  with ``config.validation_size`` examples carved off for validation."""
  if config.stream:
    data = streaming.open_stream(config.dataset, config.image_size, config.data_workers,
                                 config.seed)
    carve = streaming.carve_validation
  else:
    data = data_lib.load(config.dataset, config.image_size)
    carve = data_lib.carve_validation
  return carve(data, config.validation_size, config.seed) if config.validation_size else data


def _command_line() -> str:
  """This process's command as typed (``python main.py ...``)."""
  argv = list(sys.argv)
  return shlex.join((["python"] if argv and argv[0].endswith(".py") else []) + argv)


def check_config(config) -> None:
  """Every setting that can be checked without data or model, whatever the mode."""
  if config.mode not in MODES:
    raise ValueError(f"config.mode={config.mode!r} is not one of {tuple(MODES)}.")
  pipeline.check_config(config)
  dkm_stage.check_config(config)
  qat_stage.check_config(config)
  equal_bytes.check_config(config)
  lm.check_config(config)
  embeddings.check_config(config)
  ptq.check_config(config)
  context.cluster_rules(config)  # parses quantize.rules


def check_model(config, model, sample_shape) -> None:
  """Settings that need the model (traced abstractly, nothing trained)."""
  if config.mode == "survey":
    survey.check_config(config, model, sample_shape)


def run(config, workdir, command: str | None = None) -> dict:
  """Runs the configured mode; returns its results dict (also in results.json,
  and its summary for the docs in summary.json with ``command``, by default
  this process's command line)."""
  check_config(config)
  if config.distributed:
    jax.distributed.initialize()
  workdir = prepare_workdir(workdir)
  if config.mode in TRANSFORMER_MODES:
    results = MODES[config.mode](config, workdir)
    report_lib.write_results(workdir, results)
    report_lib.write_summary(workdir, config, results, command or _command_line())
    logging.info("results in %s", workdir / "results.json")
    return results
  data = load_data(config)
  logging.info("data %s: %d train examples of shape %s, %d classes", data.name,
               data.num_train, data.sample_shape, data.num_classes)
  model = models.create_model(config, data.num_classes)
  check_model(config, model, data.sample_shape)
  ctx = context.Context(config, data, train_lib.Mesh1D(), report_lib.MetricWriter(workdir),
                         workdir)
  tx = ctx.optimizer(config.num_epochs, config.learning_rate)
  state = train_lib.init_state(model, data.sample_shape, tx, config.seed)
  if config.init_checkpoint:
    state = restore_init_checkpoint(config.init_checkpoint, state)
  else:
    state = ctx.train(state, config.num_epochs, "baseline")
  baseline = train_lib.evaluate(state, data, config.eval_batch_size, ctx.mesh)
  results = {"parameters": int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
             "baseline_test_loss": baseline["test_loss"]}
  ctx.score(results, "baseline", state)
  results = MODES[config.mode](ctx, state, results)
  report_lib.write_results(workdir, results)
  report_lib.write_summary(workdir, config, results, command or _command_line())
  # The whole of results.json (energy per layer, allocations) would bury the log.
  summary = {k: results[k] for k in ("accuracy", "validation_accuracy", "compression_ratio")
             if k in results}
  logging.info("results (all in %s): %s", workdir / "results.json", json.dumps(summary))
  return results


def default_workdir(config_path: str) -> str:
  """runs/<config name>[-<variant>] for --config=configs/<name>.py[:<variant>]."""
  path, _, variant = config_path.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{name}-{variant}" if variant else name)
