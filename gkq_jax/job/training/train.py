"""Training: a TrainState with batch statistics, pure jitted steps, and the loop.

The steps are pure functions of (state, batch); the loop around them owns the
I/O: batches placed on a data-parallel mesh, orbax checkpoints every epoch
(a rerun with the same workdir resumes), metrics to absl logging and to
``metrics.jsonl``, a NaN guard that names the step.
"""

from __future__ import annotations

import functools
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

from gkq_jax.job.data import augment as augment_lib


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


def create_optimizer(name: str, learning_rate: float, *, total_steps: int, warmup_steps: int,
                     momentum: float, weight_decay: float) -> optax.GradientTransformation:
  """SGD (Nesterov momentum, L2 decay added to the gradient) or AdamW on a warm-up +
  cosine schedule that ends at 1e-3 x ``learning_rate``."""
  total = max(1, total_steps)
  warmup = max(0, min(warmup_steps, total - 1))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, total,
                                                learning_rate * 1e-3) \
      if warmup > 0 else optax.cosine_decay_schedule(learning_rate, total, 1e-3)
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(schedule, momentum=momentum, nesterov=True))
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=weight_decay)
  raise ValueError(f"optimizer={name!r}: use 'sgd' or 'adamw'.")


def init_state(model: nn.Module, sample_shape: tuple[int, ...], tx, seed: int) -> TrainState:
  """Variables of ``model`` for inputs of ``sample_shape`` (one example, no batch axis)."""
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(seed), jnp.zeros((1,) + tuple(sample_shape), jnp.float32))
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


def evaluate(state: TrainState, data, batch_size: int, mesh: Mesh1D, params=None,
             split: str = "test") -> dict:
  """{split}_loss and {split}_accuracy of ``state`` (or of ``params`` in its
  model) on the "test" or "validation" split of ``data``."""
  step = _jitted_eval()
  params = state.params if params is None else params
  totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  batches = data.test_batches if split == "test" else data.validation_batches
  for batch in batches(batch_size):
    out = step(state, params, mesh.put_batch(batch))
    for k in totals:
      # Replicated scalars: under jax.distributed each host reads its own copy.
      totals[k] += float(np.asarray(out[k].addressable_data(0)))
  return {f"{split}_loss": totals["loss"] / totals["count"],
          f"{split}_accuracy": totals["correct"] / totals["count"]}


@functools.lru_cache(maxsize=None)
def _jitted_eval():
  return jax.jit(eval_step)


# ---------------------------------------------------------------------- loop


def _checkpoint_manager(directory: pathlib.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory.resolve(),
                               options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))


def restore_latest(directory: pathlib.Path, target):
  """(global step, state, data position) of the newest checkpoint in
  ``directory``, or (None, target, None) when there is none."""
  if not directory.exists():
    return None, target, None
  with _checkpoint_manager(directory) as manager:
    step = manager.latest_step()
    if step is None:
      return None, target, None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), position=ocp.args.JsonRestore()))
    return step, restored.state, restored.position


def _save(manager, step: int, state, position: dict) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             position=ocp.args.JsonSave(position)))


def _iterator_state(batches) -> str | None:
  """A streaming iterator's own state (grain's), to resume it mid-epoch exactly."""
  get_state = getattr(batches, "get_state", None)
  if get_state is None:
    return None
  state = get_state()
  return state.decode() if isinstance(state, bytes) else state


def make_train_step(*, augment: bool = False, cutout: int = 0, label_smoothing: float = 0.0,
                    extra_loss: Callable | None = None,
                    after_step: Callable | None = None) -> Callable:
  """The jitted step ``(state, batch, key) -> (state, metrics)`` that :func:`fit` runs.

  ``augment``: random crop + flip (and ``cutout``) on the device, drawn from
  the step's key so a resumed run sees the same images. ``extra_loss(params,
  x, logits)`` is added to the loss (distillation, regularisers);
  ``after_step(state) -> state`` runs inside the step. The state is donated.
  """

  def step(state, batch, key):
    if augment:
      x, y = batch
      batch = (augment_lib.crop_flip_cutout(jax.random.fold_in(key, 1), x, cutout=cutout), y)
    state, metrics = train_step(state, batch, key, extra_loss, label_smoothing)
    if after_step is not None:
      state = after_step(state)
    return state, metrics

  return jax.jit(step, donate_argnums=0)


def fit(state: TrainState, data, step: Callable, *, num_epochs: int, batch_size: int,
        seed: int, checkpoint_dir: pathlib.Path, mesh: Mesh1D, writer,
        eval_batch_size: int, log_every: int = 50, checkpoint_every: int = 0,
        stage: str = "train") -> TrainState:
  """Trains ``num_epochs`` epochs of ``step``, checkpointing at the end of each
  (and every ``checkpoint_every`` steps when > 0); resumes a stage in progress
  from the newest checkpoint in ``checkpoint_dir``.

  ``data`` is any object with ``num_train``, ``train_batches(batch_size, seed,
  epoch, resume)`` and ``test_batches(batch_size)`` (see ``job/data.py`` and
  ``job/streaming.py``). A checkpoint holds the state and the data position
  (epoch, batches done and, for a streaming source, its iterator state), so a
  killed run continues with the batches an uninterrupted one would see.
  ``writer.write(**record)`` gets one record per epoch (``report.MetricWriter``).
  """
  if batch_size > data.num_train:
    raise ValueError(f"batch_size={batch_size} is larger than the {data.num_train} training "
                     f"examples of {data.name}; set --config.batch_size={data.num_train} or "
                     "less.")
  if batch_size % mesh.size:
    raise ValueError(f"batch_size={batch_size} must be a multiple of the {mesh.size} devices.")
  steps_per_epoch = data.num_train // batch_size
  done, state, position = restore_latest(checkpoint_dir, state)
  done = done or 0
  if done:
    logging.info("%s: resumed from the checkpoint of step %d (epoch %d)", stage, done,
                 done // steps_per_epoch + 1)
  # The step donates its state: work on copies so the caller's arrays (a
  # teacher, masks, the previous stage's weights) stay alive.
  state = mesh.replicate(jax.tree.map(lambda x: jnp.array(x, copy=True), state))
  base_key = jax.random.PRNGKey(seed)
  total_steps = steps_per_epoch * num_epochs
  with _checkpoint_manager(checkpoint_dir) as manager:
    for epoch in range(done // steps_per_epoch, num_epochs):
      t0 = time.perf_counter()
      first = done - epoch * steps_per_epoch  # batches of this epoch already trained
      resume = position if first > 0 and position and position["epoch"] == epoch else None
      batches = data.train_batches(batch_size, seed, epoch, resume)
      pending, epoch_losses, accs = [], [], []
      for i, (x, y) in enumerate(batches, start=first):
        global_step = epoch * steps_per_epoch + i
        key = jax.random.fold_in(base_key, global_step)
        state, metrics = step(state, mesh.put_batch((x, y)), key)
        pending.append(metrics["loss"])
        accs.append(metrics["accuracy"])
        if (i + 1) % log_every == 0 or i + 1 == steps_per_epoch:
          epoch_losses += _check_finite(pending, global_step - len(pending) + 1, stage)
          rate = (i + 1 - first) / (time.perf_counter() - t0)
          remaining = total_steps - global_step - 1
          logging.info("%s epoch %d step %d/%d  %.2f steps/s  ETA %s", stage, epoch + 1,
                       i + 1, steps_per_epoch, rate, _eta(remaining / max(rate, 1e-9)))
        if checkpoint_every and (global_step + 1) % checkpoint_every == 0 \
            and i + 1 < steps_per_epoch:
          epoch_losses += _check_finite(pending, global_step - len(pending) + 1, stage)
          _save(manager, global_step + 1, state, {"epoch": epoch, "batches": i + 1,
                                                  "iterator": _iterator_state(batches)})
        if i + 1 == steps_per_epoch:
          break
      record = dict(stage=stage, epoch=epoch + 1, train_loss=float(np.mean(epoch_losses)),
                    train_accuracy=float(np.mean([float(a) for a in accs])),
                    epoch_seconds=time.perf_counter() - t0)
      record.update(evaluate(state, data, eval_batch_size, mesh))
      if getattr(data, "has_validation", False):
        record.update(evaluate(state, data, eval_batch_size, mesh, split="validation"))
      writer.write(**record)
      done = (epoch + 1) * steps_per_epoch
      _save(manager, done, state, {"epoch": epoch + 1, "batches": 0, "iterator": None})
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
