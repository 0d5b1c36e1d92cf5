"""Training: a TrainState with batch statistics, pure jitted steps, and the loop.

The steps are pure functions of (state, batch); the loop around them owns the
I/O: batches placed on a data-parallel mesh, orbax checkpoints every epoch
(a rerun with the same workdir resumes), metrics to absl logging and to
``metrics.jsonl``, a NaN guard that names the step.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gkq_jax import augment as augment_lib
from gkq_jax import data as data_lib


class TrainState(train_state.TrainState):
  batch_stats: Any = None


class NonFiniteLossError(FloatingPointError):
  pass


# ------------------------------------------------------------------- pure steps


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  if label_smoothing:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def apply_model(state, params, x, train, dropout_key=None):
  """(logits, updated batch stats or None) of ``state``'s model with ``params``."""
  variables = {"params": params}
  if state.batch_stats is not None:
    variables["batch_stats"] = state.batch_stats
  if train:
    out, updates = state.apply_fn(variables, x, train=True, rngs={"dropout": dropout_key},
                                  mutable=["batch_stats"] if state.batch_stats is not None else [])
    return out, updates.get("batch_stats")
  return state.apply_fn(variables, x, train=False), None


def train_step(state: TrainState, batch, dropout_key, extra_loss: Callable | None = None,
               label_smoothing: float = 0.0):
  """One optimiser step; returns the new state and {loss, accuracy}."""
  x, y = batch

  def loss_fn(params):
    logits, new_stats = apply_model(state, params, x, True, dropout_key)
    loss = cross_entropy(logits, y, label_smoothing)
    total = loss if extra_loss is None else loss + extra_loss(params, x, logits)
    return total, (loss, logits, new_stats)

  grads, (loss, logits, new_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  if new_stats is not None:
    state = state.replace(batch_stats=new_stats)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
  return state, {"loss": loss, "accuracy": accuracy}


def eval_step(state: TrainState, params, batch):
  """Sums over the batch, so partial batches (weight 0 padding) add up exactly."""
  x, y, w = batch
  logits, _ = apply_model(state, params, x, False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return {"loss": jnp.sum(losses * w), "correct": jnp.sum((jnp.argmax(logits, -1) == y) * w),
          "count": jnp.sum(w)}


# ------------------------------------------------------------------ set-up


def create_optimizer(config, steps_per_epoch: int, num_epochs: int,
                     learning_rate: float | None = None) -> optax.GradientTransformation:
  lr = config.learning_rate if learning_rate is None else learning_rate
  total = max(1, steps_per_epoch * num_epochs)
  warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), total, lr * 1e-3) \
      if warmup > 0 else optax.cosine_decay_schedule(lr, total, 1e-3)
  if config.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum, nesterov=True))
  if config.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=config.weight_decay)
  raise ValueError(f"config.optimizer={config.optimizer!r}: use 'sgd' or 'adamw'.")


def init_state(model: nn.Module, sample_x: np.ndarray, tx, seed: int) -> TrainState:
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(seed), jnp.asarray(sample_x[:1]))
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats"))


class Mesh1D:
  """Data parallelism over every device (all hosts): batch split, state replicated."""

  def __init__(self):
    self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
    self.batch = NamedSharding(self.mesh, PartitionSpec("data"))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())

  @property
  def size(self):
    return self.mesh.size

  def put_batch(self, arrays):
    return tuple(jax.make_array_from_process_local_data(self.batch, np.asarray(a))
                 for a in arrays)

  def replicate(self, tree):
    return jax.device_put(tree, self.replicated)


def evaluate(state: TrainState, ds: data_lib.Dataset, batch_size: int, mesh: Mesh1D,
             params=None) -> dict:
  step = _jitted_eval()
  params = state.params if params is None else params
  totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  for batch in data_lib.eval_batches(ds.test_x, ds.test_y, batch_size):
    out = step(state, params, mesh.put_batch(batch))
    for k in totals:
      totals[k] += float(out[k])
  return {"test_loss": totals["loss"] / totals["count"],
          "test_accuracy": totals["correct"] / totals["count"]}


@functools.lru_cache(maxsize=None)
def _jitted_eval():
  return jax.jit(eval_step)


# ------------------------------------------------------------------- logging


class MetricWriter:
  """absl logging plus one JSON object per line in ``workdir/metrics.jsonl``."""

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / "metrics.jsonl"

  def write(self, **record):
    record = {k: (float(v) if isinstance(v, (np.floating, jax.Array)) else v)
              for k, v in record.items()}
    logging.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in record.items()))
    if jax.process_index() == 0:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------- loop


def _checkpoint_manager(directory: pathlib.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory.resolve(),
                               options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))


def restore_latest(directory: pathlib.Path, target):
  """(epoch, tree) of the newest checkpoint in ``directory``, or (None, target)."""
  if not directory.exists():
    return None, target
  with _checkpoint_manager(directory) as manager:
    step = manager.latest_step()
    if step is None:
      return None, target
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return step, manager.restore(step, args=ocp.args.StandardRestore(abstract))


def fit(state: TrainState, ds: data_lib.Dataset, config, *, num_epochs: int,
        workdir: pathlib.Path, stage: str, mesh: Mesh1D, writer: MetricWriter,
        extra_loss: Callable | None = None, after_step: Callable | None = None) -> TrainState:
  """Trains ``num_epochs`` epochs, checkpointing each; resumes a stage in progress.

  ``after_step(state) -> state`` (jit-able) runs inside the step, e.g. to
  project weights back onto their shared values.
  """
  batch = config.batch_size
  if batch > len(ds.train_x):
    raise ValueError(f"batch_size={batch} is larger than the {len(ds.train_x)} training "
                     f"examples of {ds.name}; set --config.batch_size={len(ds.train_x)} or less.")
  if batch % mesh.size:
    raise ValueError(f"batch_size={batch} must be a multiple of the {mesh.size} devices.")
  steps_per_epoch = len(ds.train_x) // batch
  ckpt_dir = workdir / "checkpoints" / stage
  done, state = restore_latest(ckpt_dir, state)
  start_epoch = 0 if done is None else done
  if done is not None:
    logging.info("%s: resumed from the checkpoint of epoch %d", stage, done)
  # The step donates its state: work on copies so the caller's arrays (a
  # teacher, masks, the previous stage's weights) stay alive.
  state = mesh.replicate(jax.tree.map(lambda x: jnp.array(x, copy=True), state))

  def step_fn(state, batch, key):
    if config.augment:
      x, y = batch
      batch = (augment_lib.crop_flip_cutout(jax.random.fold_in(key, 1), x,
                                            cutout=config.get("cutout", 0)), y)
    state, metrics = train_step(state, batch, key, extra_loss,
                                config.get("label_smoothing", 0.0))
    if after_step is not None:
      state = after_step(state)
    return state, metrics

  step = jax.jit(step_fn, donate_argnums=0)
  base_key = jax.random.PRNGKey(config.seed)
  total_steps = steps_per_epoch * num_epochs
  with _checkpoint_manager(ckpt_dir) as manager:
    for epoch in range(start_epoch, num_epochs):
      t0 = time.perf_counter()
      pending, epoch_losses, accs = [], [], []
      for i, (x, y) in enumerate(data_lib.train_batches(ds, batch, config.seed, epoch)):
        global_step = epoch * steps_per_epoch + i
        key = jax.random.fold_in(base_key, global_step)
        state, metrics = step(state, mesh.put_batch((x, y)), key)
        pending.append(metrics["loss"])
        accs.append(metrics["accuracy"])
        if (i + 1) % config.log_every == 0 or i + 1 == steps_per_epoch:
          epoch_losses += _check_finite(pending, global_step - len(pending) + 1, stage)
          rate = (i + 1) / (time.perf_counter() - t0)
          remaining = total_steps - global_step - 1
          logging.info("%s epoch %d step %d/%d  %.2f steps/s  ETA %s", stage, epoch + 1,
                       i + 1, steps_per_epoch, rate, _eta(remaining / max(rate, 1e-9)))
      train_loss = float(np.mean(epoch_losses))
      record = dict(stage=stage, epoch=epoch + 1, train_loss=train_loss,
                    train_accuracy=float(np.mean([float(a) for a in accs])),
                    epoch_seconds=time.perf_counter() - t0)
      record.update(evaluate(state, ds, config.eval_batch_size, mesh))
      writer.write(**record)
      manager.save(epoch + 1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
  return state


def _check_finite(losses, first_step, stage) -> list[float]:
  """Fetches the pending step losses; raises naming the first non-finite step."""
  values = np.asarray([float(l) for l in losses])
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise NonFiniteLossError(
        f"{stage}: the training loss became {values[bad[0]]} at step {first_step + bad[0]}; "
        "lower --config.learning_rate or check the data for NaN/inf. Checkpoints of "
        "earlier epochs are kept; rerun to resume from the last one.")
  losses.clear()
  return values.tolist()


def _eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  return f"{m}m{s:02d}s"
