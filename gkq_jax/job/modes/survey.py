"""The survey mode: every compression method from one baseline, measured alike.

``python main.py --config=configs/lenet5.py:survey_fashion_mnist`` trains (or
restores) the baseline, then runs each of ``survey.methods``:

  ``baseline``          the fp32 model as trained
  ``gkq_<b>bit``        this project: gradient-weighted k-means weight sharing,
                        2**b shared values per layer, fine-tuned on them
  ``lowrank``           truncated SVD of the ``survey.lowrank_layers``, rank per
                        layer by ``lowrank_ratio`` (or ``lowrank_energy``), factors
                        fine-tuned (Yu et al.)
  ``lowrank_sparse``    the same plus a sparse residual of ``sparse_fraction`` of
                        each kernel, kept sparse while fine-tuning
  ``prune_norm``        structured pruning of ``prune_fraction`` of every layer's
                        conv filters (L1 norm, Li et al.) and Dense neurons (L2
                        norm), ResNets: the inner channels of each block; fine-tuned
  ``prune_datafree``    the same with Dense neurons merged by Srinivas & Babu's
                        data-free criterion
  ``remove_blocks``     ResNets: the ``remove_blocks`` identity blocks whose
                        removal costs the least validation accuracy; fine-tuned
  ``distill``           a smaller student (``survey.student``: model fields)
                        trained from scratch on the teacher's soft targets
  ``qat_<b>bit``        uniform per-channel fake-quantized weights, STE, b bits
                        (ResNets: BatchNorm folded), fine-tuned (Jacob et al.);
                        ``qat_<b>bit_tensor``: one scale per tensor
  ``binary``            sign x per-layer scale, STE (Courbariaux et al.)
  ``<method>+gkq_<b>bit``  gkq applied to another method's result

Each method's fine-tuning learning rate is chosen among
``survey.learning_rates`` by validation accuracy (``config.validation_size``);
test accuracy is computed once, from the method's file. Every method's
variables are written with :func:`gkq_jax.save` (``survey/<method>.gkq``) and
its row (``survey/<method>.json``) when it is done; a rerun skips finished
methods and resumes an interrupted one from its checkpoints. Latency and
energy are measured afresh on every run, all methods side by side, and
``survey.md``, ``survey.json`` and the plots are written by ``job/report.py``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

import gkq_jax as gkq
from gkq_jax.job import context, models
from gkq_jax.job import report as report_lib
from gkq_jax.job.models import surgery
from gkq_jax.job.training import measure
from gkq_jax.job.training import train as train_lib

FP32_BASES = ("baseline", "lowrank", "lowrank_sparse", "prune_norm", "prune_datafree",
              "remove_blocks", "distill")
_GKQ = re.compile(r"^gkq_(\d+)bit$")
_QAT = re.compile(r"^qat_(\d+)bit(_tensor)?$")


@dataclasses.dataclass
class Outcome:
  """A method's result: the model, its variables as stored (clustered leaves
  allowed), the model fields that differ from the baseline's, and notes."""

  model: nn.Module
  stored: dict
  architecture: dict
  info: dict


def parse_method(name: str) -> tuple[str, int | None, tuple[str, int] | None]:
  """(kind, bits, (base kind of a ``<base>+gkq_<b>bit`` combination, bits) or None)."""
  base, plus, rest = name.partition("+")
  if plus:
    kind, bits, combo = parse_method(rest)
    if kind != "gkq" or combo or base not in FP32_BASES or base == "baseline":
      raise ValueError(f"survey method {name!r}: a combination is '<method>+gkq_<b>bit' with "
                       f"<method> one of {FP32_BASES[1:]}.")
    return "gkq", bits, (base, bits)
  for pattern, kind in ((_GKQ, "gkq"), (_QAT, "qat")):
    m = pattern.match(name)
    if m:
      bits = int(m.group(1))
      if not 1 <= bits <= 16:
        raise ValueError(f"survey method {name!r}: bits must be in 1..16.")
      return kind + ("_tensor" if kind == "qat" and m.group(2) else ""), bits, None
  if name in FP32_BASES or name == "binary":
    return name, None, None
  raise ValueError(f"unknown survey method {name!r}; use baseline, gkq_<b>bit, qat_<b>bit, "
                   f"qat_<b>bit_tensor, binary, {', '.join(FP32_BASES[1:])} or "
                   "'<method>+gkq_<b>bit'.")


def _tuples(value):
  """JSON lists back to the tuples flax module fields hold."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


# ------------------------------------------------------------------ survey


class Survey:
  """Runs the methods of ``config.survey`` from the baseline ``state``."""

  def __init__(self, ctx: context.Context, state):
    self.ctx, self.cfg = ctx, ctx.config.survey
    self.model = models.create_model(ctx.config, ctx.data.num_classes)
    self.base = {"params": state.params}
    if state.batch_stats is not None:
      self.base["batch_stats"] = state.batch_stats
    self.dir = ctx.workdir / "survey"
    self.outcomes: dict[str, Outcome] = {}

  # -------------------------------------------------------------- helpers

  def _state(self, model, variables, tx, apply_fn=None):
    return train_lib.TrainState.create(apply_fn=apply_fn or model.apply,
                                       params=variables["params"], tx=tx,
                                       batch_stats=variables.get("batch_stats"))

  def _variables(self, state) -> dict:
    out = {"params": state.params}
    if state.batch_stats is not None:
      out["batch_stats"] = state.batch_stats
    return out

  def _validation(self, state) -> float | None:
    if not getattr(self.ctx.data, "has_validation", False):
      return None
    return self.ctx.evaluate(state, split="validation")

  def _require_validation(self, what: str) -> None:
    if not getattr(self.ctx.data, "has_validation", False):
      raise ValueError(f"survey: {what} is chosen on a validation split; set "
                       "--config.validation_size (e.g. 5000) to carve one from the training "
                       "set.")

  def tune(self, name: str, model, variables, *, epochs: int, tx_for: Callable,
           apply_fn=None, extra_loss=None):
    """Fine-tunes from ``variables`` at each of ``survey.learning_rates``; returns
    (the state with the best validation accuracy, info)."""
    rates = tuple(float(r) for r in self.cfg.learning_rates)
    if not rates:
      raise ValueError("survey.learning_rates is empty; give at least one learning rate.")
    if len(rates) > 1:
      self._require_validation("each method's learning rate")
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", name.replace("+", "_plus_"))
    best, tried = None, {}
    for lr in rates:
      state = self._state(model, variables, tx_for(lr), apply_fn)
      if epochs > 0:
        state = self.ctx.train(state, epochs, f"survey_{tag}_lr{lr:g}", extra_loss)
      val = self._validation(state)
      tried[f"{lr:g}"] = val
      if best is None or (val is not None and val > best[0]):
        best = (val if val is not None else -1.0, lr, state)
      if epochs <= 0:
        break  # nothing to choose between
    logging.info("survey %s: validation accuracy per learning rate %s", name, tried)
    return best[2], {"learning_rate": best[1], "validation_by_learning_rate": tried,
                     "epochs": epochs}

  def _finetune_tx(self, epochs):
    return lambda lr: self.ctx.optimizer(max(epochs, 1), lr)

  # -------------------------------------------------------------- methods

  def baseline(self, name) -> Outcome:
    return Outcome(self.model, self.base, {}, {})

  def gkq(self, name, bits, combo) -> Outcome:
    if combo:
      start = self.outcome(combo[0])
      model, variables, arch = start.model, start.stored, start.architecture
    else:
      model, variables, arch = self.model, self.base, {}
    qcfg = self.ctx.config.quantize
    state = self._state(model, variables, optax.identity())
    importance = context.importance_of(self.ctx, state, qcfg.importance)
    rules = [gkq.bits_rule(r"(^|/)kernel$", bits)]
    q = gkq.quantize(variables["params"], importance, rules, granularity=qcfg.granularity,
                     key=jax.random.PRNGKey(self.ctx.config.seed), method=qcfg.method,
                     init=qcfg.init, objective=qcfg.objective)
    start = dict(variables, params=_dense(q))
    epochs = int(self.cfg.epochs)
    reduce = self.ctx.config.finetune.reduce
    state, info = self.tune(name, model, start, epochs=epochs, tx_for=lambda lr: optax.chain(
        self.ctx.optimizer(max(epochs, 1), lr), gkq.share_centroids(q, reduce)))
    q = gkq.refresh_codebooks(q, state.params)
    return Outcome(model, dict(self._variables(state), params=q), arch,
                   {**info, "bits": bits, "importance": qcfg.importance})

  def lowrank(self, name, sparse: bool = False) -> Outcome:
    cfg = self.cfg
    params = self.base["params"]
    kw = {"energy": float(cfg.lowrank_energy)} if cfg.lowrank_energy else {
        "ratio": float(cfg.lowrank_ratio)}
    ranks = gkq.choose_ranks(params, pattern=cfg.lowrank_layers, **kw)
    new = gkq.factorize_params(params, ranks)
    masks = None
    if sparse:
      for layer, rank in ranks.items():
        node = new
        for key in layer.split("/"):
          node = node[key]
        original = surgery.subtree(params, layer)
        first, second, residual = gkq.low_rank_sparse(original["kernel"], rank,
                                                      float(cfg.sparse_fraction))
        node["first"]["kernel"], node["second"]["kernel"] = first, second
        node["residual"] = {"kernel": residual}
      # Pruned residual entries stay zero while fine-tuning.
      masks = jax.tree_util.tree_map_with_path(
          lambda p, x: (np.asarray(x) != 0) if gkq.path_string(p).endswith("residual/kernel")
          else np.ones(np.shape(x), bool), new)
    arch = {"ranks": tuple(sorted(ranks.items())),
            **({"sparse": tuple(sorted(ranks))} if sparse else {})}
    model = self.model.clone(**arch)
    epochs = int(cfg.epochs)
    tx_for = self._finetune_tx(epochs)
    if masks is not None:
      tx_for = (lambda inner: lambda lr: gkq.keep_pruned(inner(lr), masks))(tx_for)
    state, info = self.tune(name, model, dict(self.base, params=new), epochs=epochs,
                            tx_for=tx_for)
    stored = self._variables(state)
    if sparse:
      stored["params"] = _sparse_residuals_as_codebooks(stored["params"])
    return Outcome(model, stored, arch, {**info, "ranks": dict(ranks)})

  def prune(self, name, datafree: bool = False) -> Outcome:
    fraction = float(self.cfg.prune_fraction)
    if not 0 <= fraction < 1:
      raise ValueError(f"survey.prune_fraction={fraction} must be in [0, 1): the share of "
                       "each layer's filters / neurons removed.")
    model, variables, kept = self.model, self.base, {}
    for group, kind, narrower in surgery.channel_groups(self.model):
      n = gkq.num_channels(variables, group)
      keep_n = n - int(round(fraction * n))
      if kind == "dense" and datafree:
        keep, variables = gkq.merge_similar_neurons(variables, group, keep_n)
      else:
        scores = gkq.filter_norms(variables, group, ord=1 if kind == "conv" else 2)
        keep = gkq.keep_largest(scores, keep_n)
        variables = gkq.keep_channels(variables, group, keep)
      model = narrower(model, keep_n)
      kept[group.producers[0]] = f"{keep_n}/{n}"
    arch = {k: getattr(model, k) for k in ("hidden", "conv_widths", "block_widths")
            if hasattr(model, k) and getattr(model, k) != getattr(self.model, k)}
    pruned_val = self._validation(self._state(model, variables, optax.identity()))
    epochs = int(self.cfg.epochs)
    state, info = self.tune(name, model, variables, epochs=epochs,
                            tx_for=self._finetune_tx(epochs))
    return Outcome(model, self._variables(state), arch,
                   {**info, "kept": kept, "validation_before_finetune": pruned_val})

  def remove_blocks(self, name) -> Outcome:
    count = int(self.cfg.remove_blocks)
    candidates = surgery.removable_blocks(self.model)
    if not 1 <= count <= len(candidates):
      raise ValueError(f"survey.remove_blocks={count}: this ResNet has {len(candidates)} "
                       f"removable blocks ({candidates}); remove between 1 and that many.")
    self._require_validation("which blocks to remove")
    base_val = self._validation(self._state(self.model, self.base, optax.identity()))
    drops = {}
    for k in candidates:
      model = self.model.clone(removed_blocks=(k,))
      variables = gkq.remove_layers(self.base, [f"BasicBlock_{k}"])
      drops[k] = base_val - self._validation(self._state(model, variables, optax.identity()))
      logging.info("survey remove_blocks: without block %d validation accuracy drops %.4f",
                   k, drops[k])
    removed = tuple(sorted(sorted(candidates, key=lambda k: (drops[k], k))[:count]))
    model = self.model.clone(removed_blocks=removed)
    variables = gkq.remove_layers(self.base, [f"BasicBlock_{k}" for k in removed])
    epochs = int(self.cfg.epochs)
    state, info = self.tune(name, model, variables, epochs=epochs,
                            tx_for=self._finetune_tx(epochs))
    return Outcome(model, self._variables(state), {"removed_blocks": removed},
                   {**info, "validation_drop_per_block": {str(k): v for k, v in drops.items()},
                    "removed_blocks": list(removed)})

  def student(self) -> nn.Module:
    return student_model(self.cfg, self.model, self.ctx.data.sample_shape)

  def distill(self, name) -> Outcome:
    student = self.student()
    fields = student_fields(self.cfg, self.model)
    teacher_model, teacher = self.model, self.base
    weight, temperature = float(self.cfg.distill_weight), float(self.cfg.distill_temperature)

    def extra_loss(params, x, logits):
      teacher_logits = teacher_model.apply(teacher, x, train=False)
      return weight * gkq.distillation_loss(logits, teacher_logits, temperature)

    epochs = int(self.cfg.student_epochs)
    init = train_lib.init_state(student, self.ctx.data.sample_shape, optax.identity(),
                                self.ctx.config.seed)
    state, info = self.tune(name, student, self._variables(init), epochs=epochs,
                            tx_for=self._finetune_tx(epochs), extra_loss=extra_loss)
    return Outcome(student, self._variables(state), fields,
                   {**info, "temperature": temperature, "distill_weight": weight})

  def qat(self, name, bits: int | None, per_channel: bool = True) -> Outcome:
    model = self.model
    binary = bits is None

    def quantized(variables):
      if binary:
        return gkq.fake_binarize(variables["params"])
      return gkq.fake_quantize(variables["params"], bits, per_channel=per_channel,
                               fold_scales=surgery.fold_scales(model, variables))

    def apply_fn(variables, x, **kw):
      return model.apply(dict(variables, params=quantized(variables)), x, **kw)

    epochs = int(self.cfg.epochs)
    state, info = self.tune(name, model, self.base, epochs=epochs,
                            tx_for=self._finetune_tx(epochs), apply_fn=apply_fn)
    variables = self._variables(state)
    params = gkq.binary_codebooks(variables["params"]) if binary else gkq.uniform_codebooks(
        variables["params"], bits, per_channel=per_channel,
        fold_scales=surgery.fold_scales(model, variables))
    return Outcome(model, dict(variables, params=params), {},
                   {**info, "bits": 1 if binary else bits,
                    "per_channel": per_channel and not binary,  # binary: one scale per layer
                    "folded_batchnorm": bool(surgery.fold_scales(model, variables))})

  # -------------------------------------------------------------- driver

  def run_method(self, name: str) -> Outcome:
    kind, bits, combo = parse_method(name)
    if kind == "baseline":
      return self.baseline(name)
    if kind == "gkq":
      return self.gkq(name, bits, combo)
    if kind in ("lowrank", "lowrank_sparse"):
      return self.lowrank(name, sparse=kind == "lowrank_sparse")
    if kind in ("prune_norm", "prune_datafree"):
      return self.prune(name, datafree=kind == "prune_datafree")
    if kind == "remove_blocks":
      return self.remove_blocks(name)
    if kind == "distill":
      return self.distill(name)
    if kind == "binary":
      return self.qat(name, None)
    return self.qat(name, bits, per_channel=kind == "qat")

  def outcome(self, name: str) -> Outcome:
    """The method's outcome: from its file when it is done, else computed now."""
    if name in self.outcomes:
      return self.outcomes[name]
    row = self.dir / f"{_file_name(name)}.json"
    if row.exists():
      saved = json.loads(row.read_text())
      arch = {k: _tuples(v) for k, v in saved["architecture"].items()}
      stored = gkq.load(self.dir / f"{_file_name(name)}.gkq")
      outcome = Outcome(self.model.clone(**arch), stored, arch, saved["info"])
    else:
      outcome = self.run_method(name)
    self.outcomes[name] = outcome
    return outcome

  def row(self, name: str) -> dict:
    """The method's row: computed and saved the first time, read back afterwards."""
    path = self.dir / f"{_file_name(name)}.json"
    if path.exists():
      logging.info("survey %s: done before, read from %s", name, path)
      return json.loads(path.read_text())
    outcome = self.outcome(name)
    file = self.dir / f"{_file_name(name)}.gkq"
    nbytes, sizes = gkq.save(file, outcome.stored)
    decoded = _dense(gkq.load(file))
    state = self._state(outcome.model, decoded, optax.identity())
    dense = self._variables(state)
    row = {"method": name,
           "validation_accuracy": self._validation(state),
           "test_accuracy": self.ctx.evaluate(state),
           "parameters": measure.parameter_count(outcome.stored["params"]),
           "fp32_bytes": report_lib.fp32_bytes(dense),
           "file_bytes": int(nbytes),
           "macs": measure.count_macs(outcome.model, dense, self.ctx.data.sample_shape),
           "leaf_bytes": {path: entry["bytes"] for path, entry in sizes.items()},
           "architecture": {k: _jsonable(v) for k, v in outcome.architecture.items()},
           "info": _jsonable(outcome.info)}
    report_lib.write_survey_row(path, row)
    logging.info("survey %s: test accuracy %.4f, %d bytes", name, row["test_accuracy"], nbytes)
    return row

  def measure_all(self, rows: list[dict]) -> None:
    """Latency (side by side) and energy of every finished method, in place."""
    forwards, sample = {}, tuple(self.ctx.data.sample_shape)
    for row in rows:
      name = row["method"]
      file = self.dir / f"{_file_name(name)}.gkq"
      stored = gkq.load(file)
      model = self.model.clone(**{k: _tuples(v) for k, v in row["architecture"].items()})
      forwards[name] = (measure.forward(model), _dense(stored))
      row["energy"] = measure.energy(model, stored, sample, row["leaf_bytes"])
    batches = tuple(int(b) for b in self.cfg.latency_batches)
    times = measure.latencies(forwards, sample, batches, int(self.cfg.latency_repeats))
    for row in rows:
      row["latency_ms"] = {str(b): 1e3 * times[row["method"]][b] for b in batches}


def _sparse_residuals_as_codebooks(params):
  """Each sparse residual as a lossless ClusteredArray (its non-zero values are the
  codebook, 0 is pinned), so the file stores it sparse, as Deep Compression does."""

  def convert(path, x):
    if not gkq.path_string(path).endswith("residual/kernel"):
      return x
    x = np.asarray(x)
    nonzero = np.flatnonzero(x)
    if nonzero.size + 1 > 65536:
      raise ValueError(f"a sparse residual with {nonzero.size} non-zeros does not fit 16-bit "
                       "indices; lower survey.sparse_fraction.")
    idx = np.zeros(x.size, np.uint16)
    idx[nonzero] = np.arange(1, nonzero.size + 1)
    book = np.concatenate([[0.0], x.reshape(-1)[nonzero]]).astype(np.float32)[None, :]
    return gkq.ClusteredArray(jnp.asarray(book), jnp.asarray(idx.reshape(x.shape)),
                              pinned_zero=True)

  return jax.tree_util.tree_map_with_path(convert, params)


def _dense(tree):
  """The tree with clustered leaves dequantized, in one compiled call (eager
  dequantization compiles every operation for every shape)."""
  return jax.jit(gkq.dequantize)(tree)


def _file_name(method: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]", "_", method.replace("+", "_plus_"))


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating, jax.Array)):
    return float(value)
  return value


def pareto_front(rows: list[dict], cost: Callable[[dict], float]) -> list[bool]:
  """True for each row that no other row beats: at least as accurate (test) and at
  most as costly, and strictly better in one of the two."""
  flags = []
  for r in rows:
    beaten = any(o is not r and o["test_accuracy"] >= r["test_accuracy"] and cost(o) <= cost(r)
                 and (o["test_accuracy"] > r["test_accuracy"] or cost(o) < cost(r))
                 for o in rows)
    flags.append(not beaten)
  return flags


def student_fields(cfg, model: nn.Module) -> dict:
  """The student's model fields: ``survey.student``'s set fields over the
  default, the same model at half width (:func:`surgery.half_width`)."""
  chosen = {k: _tuples(v) for k, v in cfg.student.items() if v is not None}
  return {**surgery.half_width(model), **chosen}


def student_model(cfg, model: nn.Module, sample_shape) -> nn.Module:
  """The distillation student, checked to be a smaller model of the same kind."""
  fields = student_fields(cfg, model)
  try:
    student = model.clone(**fields)
  except TypeError as e:
    raise ValueError(f"survey.student {fields}: {e}") from None
  shape = (1,) + tuple(sample_shape)
  count = lambda m: measure.parameter_count(jax.eval_shape(  # noqa: E731
      lambda: m.init(jax.random.PRNGKey(0), jnp.zeros(shape)))["params"])
  mine, teacher = count(student), count(model)
  if mine >= teacher:
    raise ValueError(f"survey.student {fields} has {mine:,} parameters, not fewer than the "
                     f"teacher's {teacher:,}; make the student narrower or shallower.")
  return student


def check_config(config, model: nn.Module, sample_shape) -> None:
  """Everything that can be wrong with the survey's config, checked against the
  model before any training (``run.check_config``)."""
  cfg = config.survey
  names = list(cfg.methods)
  if not names:
    raise ValueError("survey.methods is empty; name at least one method, e.g. "
                     "--config.survey.methods='(\"baseline\",)'.")
  if len(set(names)) != len(names):
    raise ValueError(f"survey.methods lists a method twice: {names}.")
  kinds = set()
  for name in names:
    kind, _, combo = parse_method(name)
    kinds |= {kind} | ({combo[0]} if combo else set())
  if "distill" in kinds:
    student_model(cfg, model, sample_shape)
  if "remove_blocks" in kinds:
    surgery.removable_blocks(model)
  if kinds & {"prune_norm", "prune_datafree"}:
    surgery.channel_groups(model)


def survey(ctx: context.Context, state, results: dict) -> dict:
  """The survey mode (see the module docstring); adds ``results["survey"]``."""
  runner = Survey(ctx, state)
  runner.dir.mkdir(parents=True, exist_ok=True)
  rows = []
  for name in ctx.config.survey.methods:
    rows.append(runner.row(name))
    context.release_compiled()  # each method's programs are its own: keep the mappings few
  runner.measure_all(rows)
  context.release_compiled()
  base_bytes = next((r["fp32_bytes"] for r in rows if r["method"] == "baseline"),
                    report_lib.fp32_bytes(runner.base))
  for row in rows:
    row["compression"] = base_bytes / row["file_bytes"]
  latency_key = str(max(int(b) for b in ctx.config.survey.latency_batches))
  for key, cost in (("pareto_bytes", lambda r: r["file_bytes"]),
                    ("pareto_latency", lambda r: r["latency_ms"][latency_key])):
    for row, flag in zip(rows, pareto_front(rows, cost)):
      row[key] = flag
  text, plots = report_lib.write_survey(ctx.workdir, rows, latency_key)
  print(text)
  results.update(survey=rows, survey_plots=plots)
  return results
