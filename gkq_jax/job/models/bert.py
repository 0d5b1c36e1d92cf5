"""BERT encoder in flax.nnx, the architecture of Hugging Face's ``BertModel``.

The job compresses pretrained sentence encoders (all-MiniLM-L6-v2 and kin), so
the model computes what ``transformers`` + ``sentence-transformers`` compute:
word + position + token-type embeddings and a LayerNorm, post-LN encoder layers
(self-attention, then a GELU MLP, each added back and normalized), an optional
tanh pooler, and :meth:`Bert.embed`, the sentence embedding (mean over the
non-padding tokens, L2-normalized when the checkpoint folder says so).

Layers are plain ``nnx.Linear`` (kernel ``(in, out)``); gkq_jax.job.models.hf
maps them to and from the torch ``(out, in)`` tensors of a checkpoint folder.
Parameters may be stored in any float dtype (bf16 checkpoints stay bf16); the
activations are computed in ``dtype`` (float32 by default).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a Hugging Face BERT config.json that fix the architecture."""

  vocab_size: int
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0

  @classmethod
  def from_hf(cls, config: dict) -> BertConfig:
    # Variants this model does not compute would load without error and give
    # wrong numbers: refuse them by name.
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(f"BERT hidden_act {act!r} is not supported (only 'gelu', the exact erf "
                       "form).")
    position = config.get("position_embedding_type", "absolute")
    if position != "absolute":
      raise ValueError(f"BERT position_embedding_type {position!r} is not supported (only "
                       "'absolute').")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})

  def to_hf(self) -> dict:
    return {"architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
            "position_embedding_type": "absolute", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Pooling:
  """The sentence-transformers modules after the encoder: Transformer
  (``max_seq_length``), Pooling (``mode``: "mean" or "cls") and Normalize."""

  mode: str = "mean"
  normalize: bool = False
  max_seq_length: int | None = None

  def __post_init__(self):
    if self.mode not in ("mean", "cls"):
      raise ValueError(f"sentence-transformers pooling {self.mode!r} is not supported "
                       "(mean, cls).")


def _layer_norm(config: BertConfig, dtype, param_dtype, rngs) -> nnx.LayerNorm:
  # Two-pass variance, as torch's LayerNorm computes it.
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=dtype,
                       param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)


class Embeddings(nnx.Module):
  def __init__(self, config: BertConfig, dtype, param_dtype, rngs: nnx.Rngs):
    embed = lambda n: nnx.Embed(n, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
    self.word_embeddings = embed(config.vocab_size)
    self.position_embeddings = embed(config.max_position_embeddings)
    self.token_type_embeddings = embed(config.type_vocab_size)
    self.norm = _layer_norm(config, dtype, param_dtype, rngs)

  def __call__(self, input_ids, token_type_ids):
    positions = jnp.arange(input_ids.shape[-1])
    x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
         + self.token_type_embeddings(token_type_ids))
    return self.norm(x)


class SelfAttention(nnx.Module):
  def __init__(self, config: BertConfig, dtype, param_dtype, rngs: nnx.Rngs):
    width = config.hidden_size
    linear = lambda: nnx.Linear(width, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads = config.num_attention_heads
    self.query, self.key, self.value, self.out = linear(), linear(), linear(), linear()

  def __call__(self, x, mask):
    split = lambda y: y.reshape(*y.shape[:-1], self.heads, -1)
    # mask (batch, keys): a padding key takes no part in any query's softmax.
    y = jax.nn.dot_product_attention(split(self.query(x)), split(self.key(x)),
                                     split(self.value(x)), mask=mask[:, None, None, :])
    return self.out(y.reshape(x.shape))


class Layer(nnx.Module):
  """Post-LN: x = norm(x + attention(x)); x = norm(x + mlp(x))."""

  def __init__(self, config: BertConfig, dtype, param_dtype, rngs: nnx.Rngs):
    width, inner = config.hidden_size, config.intermediate_size
    self.attention = SelfAttention(config, dtype, param_dtype, rngs)
    self.attention_norm = _layer_norm(config, dtype, param_dtype, rngs)
    self.intermediate = nnx.Linear(width, inner, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
    self.output = nnx.Linear(inner, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.output_norm = _layer_norm(config, dtype, param_dtype, rngs)

  def __call__(self, x, mask):
    x = self.attention_norm(x + self.attention(x, mask))
    # Hugging Face's "gelu" is the exact erf form, not the tanh approximation.
    y = self.output(jax.nn.gelu(self.intermediate(x), approximate=False))
    return self.output_norm(x + y)


class Bert(nnx.Module):
  """``BertModel``: ``__call__`` gives the last hidden states, :meth:`pool` the
  tanh pooler's output (when built with ``pooler=True``), :meth:`embed` the
  sentence embedding."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, pooler: bool = False,
               pooling: Pooling | None = None, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    self.config = config
    self.pooling = pooling  # None: no sentence-transformers modules (plain mean pooling)
    self.embeddings = Embeddings(config, dtype, param_dtype, rngs)
    self.layers = nnx.List([Layer(config, dtype, param_dtype, rngs)
                            for _ in range(config.num_hidden_layers)])
    self.pooler = (nnx.Linear(config.hidden_size, config.hidden_size, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs) if pooler else None)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    """(batch, length) token ids, 1/0 mask -> (batch, length, hidden)."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
    x = self.embeddings(input_ids, token_type_ids)
    mask = attention_mask.astype(bool)
    for layer in self.layers:
      x = layer(x, mask)
    return x

  def pool(self, hidden):
    """BERT's pooler: tanh(dense(first token))."""
    if self.pooler is None:
      raise ValueError("this BERT has no pooler (its checkpoint held no pooler.dense weights).")
    return jnp.tanh(self.pooler(hidden[:, 0]))

  def embed(self, input_ids, attention_mask):
    """The sentence-transformers embedding: mean over non-padding tokens (or the
    first token for "cls" pooling), L2-normalized when the pooling says so."""
    hidden = self(input_ids, attention_mask).astype(jnp.float32)
    pooling = self.pooling or Pooling()
    if pooling.mode == "cls":
      x = hidden[:, 0]
    else:
      weights = attention_mask[..., None].astype(jnp.float32)
      x = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
    if pooling.normalize:  # torch.nn.functional.normalize's eps
      x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return x


def create(config: BertConfig, seed: int = 0, *, pooler: bool = False,
           pooling: Pooling | None = None, dtype: Any = jnp.float32,
           param_dtype: Any = jnp.float32) -> Bert:
  """A randomly initialized BERT (tests; training from scratch)."""
  return Bert(config, rngs=nnx.Rngs(seed), pooler=pooler, pooling=pooling, dtype=dtype,
              param_dtype=param_dtype)
