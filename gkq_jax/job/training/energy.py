"""Energy per example of the pipeline's models (fp32, pruned, compressed file).

The model and its costs are the library's (:mod:`gkq_jax.energy`); this module
only applies it to a job's TrainState: the variables (params and batch
statistics) are the stored weights, one test example the input, and for the
compressed file the bytes each leaf really takes in ``model.gkq``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

import gkq_jax as gkq

UNIT = "microjoules per example"


def variables_of(state, params) -> dict:
  """The variables a forward pass reads: params and, where the model has them, batch stats."""
  variables = {"params": params}
  if state.batch_stats is not None:
    variables["batch_stats"] = state.batch_stats
  return variables


def estimate(state, variables: Any, sample, file_sizes: dict | None = None) -> dict:
  """``gkq.estimate_energy`` of ``state``'s model on ``variables`` as a JSON-ready dict;
  ``file_sizes`` (from ``gkq.save``) gives the stored bytes of each leaf."""
  stored = None if file_sizes is None else {k: v["bytes"] for k, v in file_sizes.items()}
  x = np.asarray(sample)[:1]
  result = gkq.estimate_energy(lambda v, x: state.apply_fn(v, x, train=False), variables, x,
                               stored_bytes=stored)
  return result.as_dict()


def energy_report(stages: dict) -> dict:
  """The ``energy`` object of report.json: per stage the estimate, plus unit and costs."""
  return {"unit": UNIT, "costs_pj": dataclasses.asdict(gkq.EnergyCosts()),
          "stages": stages}


def compression_energy(state, sample, baseline: dict, pruned_params, compressed: dict,
                       file_sizes: dict) -> dict:
  """The ``energy`` object for the pipeline: baseline (fp32), pruned (if any), compressed file."""
  stages = {"baseline": estimate(state, {k: v for k, v in baseline.items() if v is not None},
                                 sample)}
  if pruned_params is not None:
    stages["pruned"] = estimate(state, variables_of(state, pruned_params), sample)
  stages["compressed_file"] = estimate(state, compressed, sample, file_sizes)
  return energy_report(stages)
