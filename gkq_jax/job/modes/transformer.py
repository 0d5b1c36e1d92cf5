"""What the transformer modes (:mod:`.lm`, :mod:`.embeddings`) share: where a
``config.checkpoint`` lives, loading it as the mode's model family, jitted
forwards and small JSON records.

Transformers have their own data (text, not images) and their own models
(Hugging Face checkpoints, :mod:`gkq_jax.job.models.hf`), so these modes take
``(config, workdir)`` instead of the image modes' ``(ctx, state, results)``;
:func:`gkq_jax.job.run.run` routes them here before any image data loads.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
from flax import nnx

from gkq_jax.job.models import hf

# The repository root: a relative config.checkpoint such as
# "../shared/models/all-MiniLM-L6-v2" is relative to it (or to the working directory).
ROOT = pathlib.Path(__file__).resolve().parents[3]
FAMILIES = {"llama": "Llama (LlamaForCausalLM)", "bert": "BERT / sentence-transformers"}


def _missing(spec: str) -> str:
  return (f"config.checkpoint {spec!r} is not a folder (looked in {pathlib.Path.cwd()} and "
          f"{ROOT}): point config.checkpoint at a Hugging Face checkpoint folder (config.json, "
          "model.safetensors, tokenizer.json) or at hf:owner/name.")


def resolve_checkpoint(spec: str) -> str:
  """``hf:owner/name`` as it is; a folder as an absolute path: relative ones are
  looked up in the working directory, then under the repository root."""
  if spec.startswith("hf:"):
    return spec
  path = pathlib.Path(spec).expanduser()
  for candidate in ([path] if path.is_absolute() else [pathlib.Path.cwd() / path, ROOT / path]):
    if candidate.is_dir():
      return str(candidate.resolve())
  raise ValueError(_missing(spec))


def _wrong_family(where, kind, model_type: str, mode: str) -> ValueError:
  return ValueError(f"config.checkpoint {where} holds a {kind!r} model; the {mode} mode needs a "
                    f"{FAMILIES[model_type]} checkpoint (model_type {model_type!r}).")


def check_checkpoint(spec: str, model_type: str, mode: str, required: bool) -> None:
  """Before any data loads: the folder exists and its config.json names
  ``model_type`` (an ``hf:`` name is checked once downloaded)."""
  if not spec:
    if required:
      raise ValueError(f"config.checkpoint is empty; the {mode} mode needs a "
                       f"{FAMILIES[model_type]} checkpoint folder or hf:owner/name.")
    return
  folder = resolve_checkpoint(spec)
  if folder.startswith("hf:"):
    return
  config = pathlib.Path(folder) / "config.json"
  try:
    kind = json.loads(config.read_text()).get("model_type")
  except (OSError, ValueError, AttributeError):
    return  # not readable here: the loader names what is wrong with the folder
  if kind != model_type:
    raise _wrong_family(folder, kind, model_type, mode)


def load(spec: str, model_type: str, mode: str) -> hf.Checkpoint:
  """``config.checkpoint`` read with :func:`hf.load_checkpoint` (weights as
  stored), refused when it is not of ``model_type``."""
  checkpoint = hf.load_checkpoint(resolve_checkpoint(spec))
  kind = checkpoint.config.get("model_type")
  if kind != model_type:
    raise _wrong_family(checkpoint.folder, kind, model_type, mode)
  return checkpoint


def jitted(model: nnx.Module, method: str | None = None):
  """``model`` (or its ``method``) as a plain jitted function of its inputs:
  split once, so a call costs no graph traversal (throughput at batch 1), and
  compiled once per model structure and input shape, however often it is
  asked for (a compressed copy of the same model reuses the program)."""
  graphdef, state = nnx.split(model)
  return lambda *inputs: _apply(graphdef, method, state, *inputs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(graphdef, method, state, *inputs):
  module = nnx.merge(graphdef, state)
  return (getattr(module, method) if method else module)(*inputs)


def write_json(workdir: pathlib.Path, name: str, record) -> pathlib.Path:
  """``workdir/name`` as indented JSON (written whole, then renamed)."""
  path = pathlib.Path(workdir) / name
  partial = path.with_name(path.name + ".partial")
  partial.write_text(json.dumps(record, indent=2) + "\n")
  partial.replace(path)
  return path


def parameter_count(model: nnx.Module) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
