"""Hugging Face checkpoint folders in and out of the job's flax.nnx transformers.

A folder holds config.json, model.safetensors (or the shards that
model.safetensors.index.json names), tokenizer.json and, for a
sentence-transformers model, modules.json with 1_Pooling/config.json. The job
reads such a folder (or downloads one: ``hf:owner/name``) into a
:class:`Checkpoint` and writes a compressed model back in exactly the tensor
names and torch layouts of the transformers library, so the result loads in
PyTorch unchanged. Tensors go through ``safetensors.numpy``: no torch needed.

Loading is strict, because a silently skipped or mis-shaped tensor gives a
model that runs and is wrong: a missing, unexpected, mis-shaped or non-finite
tensor is a one-line ValueError naming it. Saving checks the same before it
writes anything, and writes each file under a temporary name renamed at the
end, so an interrupted save leaves no half file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import uuid
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import tokenizers
from flax import nnx, traverse_util

from gkq_jax.job.models import bert, llama

SUPPORTED = ("bert", "llama")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
# What hf:owner/name fetches: configs, the tokenizer, sentence-transformers
# settings and the transformers weights (not ONNX, GGUF or torch copies).
_DOWNLOAD = ["*.json", "model*.safetensors"]
# Buffers older transformers versions saved beside the weights; the models
# recompute them, so they are neither loaded nor written.
_BUFFERS = re.compile(r"(^|\.)(embeddings\.position_ids|rotary_emb\.inv_freq)$")
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


@dataclasses.dataclass
class Checkpoint:
  """A loaded folder: its config.json, the nnx model with its weights, its
  tokenizer and, for sentence-transformers folders, the pooling settings."""

  folder: pathlib.Path
  config: dict
  model: nnx.Module
  tokenizer: tokenizers.Tokenizer
  pooling: bert.Pooling | None = None

  def tokenize(self, texts: Iterable[str], max_length: int | None = None):
    """Token ids and attention mask, (batch, longest) int32 each, padded on the
    right. Truncated at ``max_length``, else the sentence-transformers
    max_seq_length, else the tokenizer's own truncation."""
    tok = tokenizers.Tokenizer.from_str(self.tokenizer.to_str())  # leave ours as it was
    limit = max_length or (self.pooling.max_seq_length if self.pooling else None)
    if limit:
      tok.enable_truncation(min(limit, self.config.get("max_position_embeddings", limit)))
    pad = tok.padding or {}
    tok.enable_padding(pad_id=pad.get("pad_id", self.config.get("pad_token_id") or 0),
                       pad_token=pad.get("pad_token", "[PAD]"))
    encoded = tok.encode_batch(list(texts))
    return (np.array([e.ids for e in encoded], np.int32),
            np.array([e.attention_mask for e in encoded], np.int32))

  def embed(self, texts: Iterable[str]) -> np.ndarray:
    """Sentence embeddings (BERT checkpoints), as sentence-transformers encodes."""
    if not isinstance(self.model, bert.Bert):
      raise ValueError(f"embed needs a BERT checkpoint; {self.folder} holds "
                       f"{self.config.get('model_type')!r}.")
    ids, mask = self.tokenize(texts)
    return np.asarray(_embed(self.model, jnp.asarray(ids), jnp.asarray(mask)))


@nnx.jit
def _embed(model, ids, mask):
  return model.embed(ids, mask)


# ----------------------------------------------------------------------------- names


def _linear(hf: str, path: tuple, bias: bool = True) -> list:
  """torch Linear weight (out, in) <-> nnx.Linear kernel (in, out)."""
  rows = [(f"{hf}.weight", path + ("kernel",), True)]
  return rows + ([(f"{hf}.bias", path + ("bias",), False)] if bias else [])


def _norm(hf: str, path: tuple, bias: bool = True) -> list:
  rows = [(f"{hf}.weight", path + ("scale",), False)]
  return rows + ([(f"{hf}.bias", path + ("bias",), False)] if bias else [])


def _embedding(hf: str, path: tuple) -> list:
  return [(f"{hf}.weight", path + ("embedding",), False)]


def _bert_table(config: bert.BertConfig, pooler: bool) -> list:
  """(transformers name, nnx path, transposed) for each tensor of a BertModel.
  sentence-transformers folders store the names without the "bert." prefix."""
  rows = (_embedding("embeddings.word_embeddings", ("embeddings", "word_embeddings"))
          + _embedding("embeddings.position_embeddings", ("embeddings", "position_embeddings"))
          + _embedding("embeddings.token_type_embeddings",
                       ("embeddings", "token_type_embeddings"))
          + _norm("embeddings.LayerNorm", ("embeddings", "norm")))
  for i in range(config.num_hidden_layers):
    hf, at = f"encoder.layer.{i}.", ("layers", i)
    for name, ours in (("query", "query"), ("key", "key"), ("value", "value")):
      rows += _linear(f"{hf}attention.self.{name}", at + ("attention", ours))
    rows += _linear(f"{hf}attention.output.dense", at + ("attention", "out"))
    rows += _norm(f"{hf}attention.output.LayerNorm", at + ("attention_norm",))
    rows += _linear(f"{hf}intermediate.dense", at + ("intermediate",))
    rows += _linear(f"{hf}output.dense", at + ("output",))
    rows += _norm(f"{hf}output.LayerNorm", at + ("output_norm",))
  return rows + (_linear("pooler.dense", ("pooler",)) if pooler else [])


def _llama_table(config: llama.LlamaConfig) -> list:
  """(transformers name, nnx path, transposed) for each tensor of a LlamaForCausalLM."""
  rows = _embedding("model.embed_tokens", ("embed_tokens",))
  for i in range(config.num_hidden_layers):
    hf, at = f"model.layers.{i}.", ("layers", i)
    rows += _norm(f"{hf}input_layernorm", at + ("input_layernorm",), bias=False)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      rows += _linear(f"{hf}self_attn.{name}", at + ("self_attn", name), config.attention_bias)
    rows += _norm(f"{hf}post_attention_layernorm", at + ("post_attention_layernorm",),
                  bias=False)
    for name in ("gate_proj", "up_proj", "down_proj"):
      rows += _linear(f"{hf}mlp.{name}", at + ("mlp", name), config.mlp_bias)
  rows += _norm("model.norm", ("norm",), bias=False)
  return rows + ([] if config.tie_word_embeddings else _linear("lm_head", ("lm_head",), False))


def _architecture(config: dict, pooler: bool, pooling: bert.Pooling | None):
  """(model constructor, tensor table) for a config.json."""
  kind = config.get("model_type")
  if kind == "bert":
    cfg = bert.BertConfig.from_hf(config)
    make = lambda: bert.Bert(cfg, rngs=nnx.Rngs(0), pooler=pooler, pooling=pooling)
    return make, _bert_table(cfg, pooler)
  if kind == "llama":
    cfg = llama.LlamaConfig.from_hf(config)
    return lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)), _llama_table(cfg)
  raise ValueError(f"model_type {kind!r} is not supported; supported: {', '.join(SUPPORTED)}.")


# ----------------------------------------------------------------------------- load


def load_checkpoint(spec: str | os.PathLike, dtype: Any = None) -> Checkpoint:
  """Reads a Hugging Face checkpoint folder (or ``hf:owner/name``, downloaded)
  into a :class:`Checkpoint`. ``dtype``: cast the weights to it (None: keep
  the stored dtypes, bf16 included)."""
  folder = _resolve(spec)
  config = _read_json(folder / "config.json", folder)
  kind = config.get("model_type")
  if kind not in SUPPORTED:
    raise ValueError(f"{folder}: model_type {kind!r} is not supported; supported: "
                     f"{', '.join(SUPPORTED)}.")
  if not (folder / TOKENIZER).is_file():
    raise ValueError(f"{folder} has no {TOKENIZER} (the job reads the tokenizer from it).")
  tokenizer = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER))
  pooling = _read_pooling(folder) if kind == "bert" else None
  tensors = _read_tensors(folder)
  if kind == "llama" and config.get("tie_word_embeddings"):
    _drop_tied_copy(tensors, folder)
  make, table = _architecture(config, "pooler.dense.weight" in tensors, pooling)
  graphdef, state = nnx.split(nnx.eval_shape(make))
  shapes = {path: tuple(v.shape) for path, v in nnx.to_flat_state(state)}
  _check(tensors, table, shapes, str(folder))
  flat = {path: _param(tensors[name], transposed, dtype) for name, path, transposed in table}
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  return Checkpoint(folder, config, nnx.merge(graphdef, state), tokenizer, pooling)


def _param(array: np.ndarray, transposed: bool, dtype) -> jax.Array:
  array = array.T if transposed else array
  return jnp.asarray(array, dtype=array.dtype if dtype is None else dtype)


def _resolve(spec) -> pathlib.Path:
  text = os.fspath(spec)
  if text.startswith("hf:"):
    return _download(text[3:])
  folder = pathlib.Path(text).expanduser()
  if not folder.is_dir():
    raise ValueError(f"{text} is not a folder: pass a Hugging Face checkpoint folder "
                     "(config.json, model.safetensors, tokenizer.json) or hf:owner/name.")
  return folder


def _download(repo: str) -> pathlib.Path:
  if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo):
    raise ValueError(f"hf:{repo} is not a Hugging Face model name (hf:owner/name).")
  instead = ("download it where there is a network and pass its local folder instead "
             "(a folder with config.json, model.safetensors and tokenizer.json).")
  try:
    import huggingface_hub  # only when asked: the job runs without it
  except ImportError as error:
    raise ValueError(f"hf:{repo} needs huggingface_hub (pip install 'gkq_jax[hub]'); or "
                     + instead) from error
  # Read here, not through huggingface_hub's constants (fixed when it was
  # first imported), so an offline setting made later is never bypassed.
  offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
  try:
    path = huggingface_hub.snapshot_download(repo, allow_patterns=_DOWNLOAD,
                                             local_files_only=offline)
  except Exception as error:  # no network, offline, no such repository, gated, ...
    why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else "no network?"
    raise ValueError(f"could not download hf:{repo} from the Hugging Face hub ({why}: "
                     f"{type(error).__name__}); " + instead) from error
  return pathlib.Path(path)


def _read_json(path: pathlib.Path, folder: pathlib.Path):
  if not path.is_file():
    raise ValueError(f"{folder} has no {path.relative_to(folder)}: not a Hugging Face "
                     "checkpoint folder.")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not valid JSON ({error}).") from error


def _read_pooling(folder: pathlib.Path) -> bert.Pooling | None:
  """sentence-transformers' modules.json -> Pooling (None for a plain BERT folder)."""
  if not (folder / "modules.json").is_file():
    return None
  mode, normalize = "mean", False
  for module in _read_json(folder / "modules.json", folder):
    kind = module.get("type", "").rsplit(".", 1)[-1]
    if kind == "Pooling":
      settings = _read_json(folder / module.get("path", "") / "config.json", folder)
      modes = [m for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                           "weightedmean_tokens", "lasttoken") if settings.get(f"pooling_mode_{m}")]
      if len(modes) != 1 or modes[0] not in ("mean_tokens", "cls_token"):
        raise ValueError(f"{folder}: sentence-transformers pooling {'+'.join(modes) or 'none'}"
                         " is not supported (mean_tokens or cls_token).")
      mode = "mean" if modes[0] == "mean_tokens" else "cls"
    elif kind == "Normalize":
      normalize = True
    elif kind != "Transformer":  # a Dense head, say: the embeddings would be wrong
      raise ValueError(f"{folder}: sentence-transformers module {kind!r} is not supported "
                       "(Transformer, Pooling, Normalize).")
  length = None
  if (folder / "sentence_bert_config.json").is_file():
    length = _read_json(folder / "sentence_bert_config.json", folder).get("max_seq_length")
  return bert.Pooling(mode, normalize, length)


def _read_tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of model.safetensors or of the shards the index names."""
  if (folder / INDEX).is_file():
    weight_map = _read_json(folder / INDEX, folder).get("weight_map", {})
    files = sorted(set(weight_map.values()))
  elif (folder / WEIGHTS).is_file():
    weight_map, files = None, [WEIGHTS]
  else:
    raise ValueError(f"{folder} has neither {WEIGHTS} nor {INDEX}.")
  tensors = {}
  for file in files:
    if not (folder / file).is_file():
      raise ValueError(f"{folder}: shard {file} named by {INDEX} is missing.")
    for name, array in safetensors.numpy.load_file(folder / file).items():
      if weight_map is not None and weight_map.get(name) != file:
        raise ValueError(f"{folder}: tensor {name!r} is in {file} but {INDEX} puts it in "
                         f"{weight_map.get(name)}.")
      tensors[_legacy_name(name)] = array
  if weight_map is not None:
    lost = sorted(set(map(_legacy_name, weight_map)) - set(tensors))
    if lost:
      raise ValueError(f"{folder}: tensor {lost[0]!r} is in {INDEX} but not in its shard.")
  return {name: array for name, array in tensors.items() if not _BUFFERS.search(name)}


def _legacy_name(name: str) -> str:
  # Checkpoints converted from TensorFlow name LayerNorm's weight and bias
  # gamma and beta; transformers renames them on load, and so do we.
  return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
                re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def _drop_tied_copy(tensors: dict, folder: pathlib.Path):
  """A tied model may still store lm_head.weight; transformers ignores it when
  it is the embedding, and so do we (a different one would be lost: refused)."""
  head = tensors.pop("lm_head.weight", None)
  embed = tensors.get("model.embed_tokens.weight")
  if head is not None and (embed is None or not np.array_equal(head, embed)):
    raise ValueError(f"{folder}: tie_word_embeddings is true but lm_head.weight differs from "
                     "model.embed_tokens.weight.")


def _check(tensors: dict, table: list, shapes: dict, where: str):
  """Strict mapping: every tensor of the table, nothing else, in its shape,
  finite. ``shapes``: the nnx parameter shapes by path."""
  names = {name for name, _, _ in table}
  for problem, found in (("missing", [n for n, _, _ in table if n not in tensors]),
                         ("unexpected", sorted(set(tensors) - names))):
    if found:
      more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
      raise ValueError(f"{where}: {problem} tensor {found[0]!r}{more}.")
  for name, path, transposed in table:
    array, want = tensors[name], shapes[path]
    want = want[::-1] if transposed else want
    if tuple(array.shape) != want:
      raise ValueError(f"{where}: tensor {name!r} has shape {tuple(array.shape)}, "
                       f"expected {want}.")
    if not jnp.issubdtype(array.dtype, jnp.floating):
      raise ValueError(f"{where}: tensor {name!r} has dtype {array.dtype}, expected floats.")
    if not np.isfinite(array).all():
      raise ValueError(f"{where}: tensor {name!r} holds non-finite values (NaN or inf).")


# ----------------------------------------------------------------------------- save


def save_checkpoint(model_or_state, config, folder: str | os.PathLike, tokenizer=None,
                    shard_bytes: int | None = None) -> pathlib.Path:
  """Writes config.json, the weights (model.safetensors; shards of at most
  ``shard_bytes`` each + model.safetensors.index.json when given) and, when
  given, tokenizer.json (a tokenizers.Tokenizer or the path of one) in the
  transformers library's names and layouts. A BERT with sentence-transformers
  pooling also gets modules.json and 1_Pooling/config.json.

  ``model_or_state``: the nnx model or its parameter state; ``config``: the
  config.json dict (``Checkpoint.config``) or a BertConfig / LlamaConfig.
  Every check runs before the first file is written; files are written under
  temporary names and renamed at the end.
  """
  folder = pathlib.Path(folder)
  config = config.to_hf() if dataclasses.is_dataclass(config) else dict(config)
  if isinstance(model_or_state, nnx.Module):
    state = nnx.state(model_or_state, nnx.Param)
    pooling = getattr(model_or_state, "pooling", None)
  else:
    state, pooling = model_or_state, None
  values = {path: np.asarray(_value(v)) for path, v in nnx.to_flat_state(state)}
  make, table = _architecture(config, any(p[0] == "pooler" for p in values), pooling)
  _check_paths(values, table)
  tensors = {name: np.ascontiguousarray(values[path].T if transposed else values[path])
             for name, path, transposed in table}
  # Shapes as the config says, so a model that no longer matches it is refused.
  abstract = nnx.state(nnx.eval_shape(make))
  shapes = {path: tuple(v.shape) for path, v in nnx.to_flat_state(abstract)}
  _check(tensors, table, shapes, f"saving to {folder}")
  writers = {"config.json": _text(json.dumps(config, indent=2) + "\n")}
  writers.update(_weight_writers(tensors, shard_bytes))
  if tokenizer is not None:
    writers[TOKENIZER] = _tokenizer_writer(tokenizer)
  if pooling is not None:
    writers.update(_pooling_writers(pooling, config))
  _write_all(folder, writers)
  _remove_stale_weights(folder, writers)
  return folder


def _value(variable):
  return variable.get_value() if isinstance(variable, nnx.Variable) else variable


def _check_paths(values: dict, table: list):
  """The model's parameters are those of the config's architecture."""
  paths = {path for _, path, _ in table}
  missing = [(name, path) for name, path, _ in table if path not in values]
  if missing:
    raise ValueError(f"the model has no parameter {'/'.join(map(str, missing[0][1]))} for "
                     f"tensor {missing[0][0]!r}: it does not match the config.")
  extra = sorted(values.keys() - paths, key=str)
  if extra:
    raise ValueError(f"the model's parameter {'/'.join(map(str, extra[0]))} has no tensor "
                     "in the transformers layout of the config.")


def _weight_writers(tensors: dict, shard_bytes: int | None) -> dict:
  save = lambda part: lambda path: safetensors.numpy.save_file(part, path,
                                                               metadata={"format": "pt"})
  if not shard_bytes:
    return {WEIGHTS: save(tensors)}
  shards, size = [{}], 0
  for name, array in tensors.items():  # in table order, a tensor never split
    if shards[-1] and size + array.nbytes > shard_bytes:
      shards, size = shards + [{}], 0
    shards[-1][name], size = array, size + array.nbytes
  files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
           "weight_map": {name: file for file, part in zip(files, shards) for name in part}}
  writers = {file: save(part) for file, part in zip(files, shards)}
  writers[INDEX] = _text(json.dumps(index, indent=2) + "\n")
  return writers


def _text(content: str):
  return lambda path: pathlib.Path(path).write_text(content)


def _tokenizer_writer(tokenizer):
  if isinstance(tokenizer, tokenizers.Tokenizer):
    return lambda path: tokenizer.save(str(path))
  source = pathlib.Path(tokenizer)
  if not source.is_file():
    raise ValueError(f"tokenizer {source} is not a file (pass a tokenizers.Tokenizer or the "
                     "path of a tokenizer.json).")
  return lambda path: shutil.copyfile(source, path)


def _pooling_writers(pooling: bert.Pooling, config: dict) -> dict:
  kinds = ["Transformer", "Pooling"] + (["Normalize"] if pooling.normalize else [])
  paths = ["", "1_Pooling", "2_Normalize"]
  modules = [{"idx": i, "name": str(i), "path": paths[i],
              "type": f"sentence_transformers.models.{kind}"} for i, kind in enumerate(kinds)]
  settings = {"word_embedding_dimension": config["hidden_size"],
              "pooling_mode_cls_token": pooling.mode == "cls",
              "pooling_mode_mean_tokens": pooling.mode == "mean",
              "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
  writers = {"modules.json": _text(json.dumps(modules, indent=2) + "\n"),
             "1_Pooling/config.json": _text(json.dumps(settings, indent=2) + "\n")}
  if pooling.max_seq_length:
    writers["sentence_bert_config.json"] = _text(json.dumps(
        {"max_seq_length": pooling.max_seq_length, "do_lower_case": False}, indent=2) + "\n")
  return writers


def _write_all(folder: pathlib.Path, writers: dict):
  """Each file to a temporary name, then all renamed: no half file is left."""
  temporary = {}
  try:
    for name, write in writers.items():
      target = folder / name
      target.parent.mkdir(parents=True, exist_ok=True)
      temporary[name] = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
      write(temporary[name])
    for name, path in temporary.items():
      os.replace(path, folder / name)
  finally:
    for path in temporary.values():
      path.unlink(missing_ok=True)


def _remove_stale_weights(folder: pathlib.Path, writers: dict):
  # Weights of an earlier save in the other layout would be read instead of
  # (or mixed with) the new ones.
  for path in folder.iterdir():
    stale = path.name in (WEIGHTS, INDEX) or _SHARD.match(path.name)
    if stale and path.name not in writers:
      path.unlink()
