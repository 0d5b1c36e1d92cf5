"""The command-line job: data, model, baseline training, evaluation, results.

``main.py`` parses flags and calls :func:`run`; everything here takes a config
and a workdir, so tests drive the same code on tiny data.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
from absl import logging

from gkq_jax import data as data_lib
from gkq_jax import models
from gkq_jax import train as train_lib

MODELS = ("mlp", "lenet5", "resnet34", "resnet_tiny")


def create_model(config, num_classes: int):
  if config.model == "mlp":
    return models.MLP(tuple(config.mlp.hidden), num_classes, config.mlp.norm_every,
                      config.mlp.dropout)
  if config.model == "lenet5":
    return models.LeNet5(num_classes)
  if config.model == "resnet34":
    return models.ResNet34(num_classes, config.resnet.stem, config.resnet.width)
  if config.model == "resnet_tiny":
    return models.ResNetTiny(num_classes, config.resnet.stem)
  raise ValueError(f"config.model={config.model!r} is not one of {MODELS}.")


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


def run(config, workdir) -> dict:
  """Trains and evaluates the configured model; returns the results dict."""
  if config.get("distributed", False):
    jax.distributed.initialize()
  workdir = prepare_workdir(workdir)
  ds = data_lib.load(config.dataset, config.get("image_size"))
  logging.info("data %s: %d train / %d test images of shape %s, %d classes", ds.name,
               len(ds.train_x), len(ds.test_x), ds.train_x.shape[1:], ds.num_classes)
  model = create_model(config, ds.num_classes)
  mesh = train_lib.Mesh1D()
  writer = train_lib.MetricWriter(workdir)
  steps_per_epoch = max(1, len(ds.train_x) // config.batch_size)
  tx = train_lib.create_optimizer(config, steps_per_epoch, config.num_epochs)
  state = train_lib.init_state(model, ds.train_x, tx, config.seed)
  state = train_lib.fit(state, ds, config, num_epochs=config.num_epochs, workdir=workdir,
                        stage="baseline", mesh=mesh, writer=writer)
  results = {"baseline": train_lib.evaluate(state, ds, config.eval_batch_size, mesh)}
  results["parameters"] = int(sum(x.size for x in jax.tree.leaves(state.params)))
  if jax.process_index() == 0:
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
  logging.info("results: %s", json.dumps(results))
  return results


def default_workdir(config_path: str) -> str:
  """runs/<config name>[-<variant>] for --config=configs/<name>.py[:<variant>]."""
  path, _, variant = config_path.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{name}-{variant}" if variant else name)
