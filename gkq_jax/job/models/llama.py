"""Llama decoder in flax.nnx, the architecture of Hugging Face's ``LlamaForCausalLM``.

The job compresses decoder-only language models (and trains small ones from
scratch to compress), so the model follows the transformers definition that
their checkpoints are written for: RMSNorm before attention and before the
MLP, rotary position embeddings in the "rotate_half" convention (the halves of
each head, not interleaved pairs; ``rope_theta`` from the config), grouped-query
attention (``num_key_value_heads`` key/value heads shared by the query heads),
a SwiGLU MLP, a causal mask, and logits through the token embedding
(``tie_word_embeddings``) or a separate ``lm_head``.

Projections are plain ``nnx.Linear`` (kernel ``(in, out)``), in the style of
Flax's nnx examples; gkq_jax.job.models.hf maps them to and from the torch
``(out, in)`` tensors of a checkpoint folder. Parameters may be stored in any
float dtype; activations are computed in ``dtype`` (float32 by default).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The fields of a Hugging Face Llama config.json that fix the architecture."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int | None = None  # None: as many as the query heads (MHA)
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False

  def __post_init__(self):
    # Defaults resolved here, so equal architectures compare equal.
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads {self.num_key_value_heads}.")

  @classmethod
  def from_hf(cls, config: dict) -> LlamaConfig:
    act = config.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"Llama hidden_act {act!r} is not supported (only 'silu').")
    # transformers 5 moved rope_theta into rope_parameters; scaled variants
    # (llama3, linear, dynamic, yarn) would load and give wrong numbers.
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
      raise ValueError(f"Llama rope type {kind!r} is not supported (only unscaled 'default').")
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in config.items() if k in names}
    if "rope_theta" not in fields and "rope_theta" in rope:
      fields["rope_theta"] = rope["rope_theta"]
    return cls(**fields)

  def to_hf(self) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            **dataclasses.asdict(self)}


def rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope(x, positions, theta: float):
  """Rotary embedding of (batch, length, heads, head_dim) at (length,) positions,
  in transformers' convention: frequency i turns the pair (i, i + head_dim/2)."""
  dim = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
  y = x.astype(jnp.float32)
  return (y * jnp.cos(angles) + rotate_half(y) * jnp.sin(angles)).astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, config: LlamaConfig, dtype, param_dtype, rngs: nnx.Rngs):
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    size, width = config.head_dim, config.hidden_size
    linear = lambda n_in, n_out: nnx.Linear(n_in, n_out, use_bias=config.attention_bias,
                                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear(width, heads * size)
    self.k_proj = linear(width, kv * size)
    self.v_proj = linear(width, kv * size)
    self.o_proj = linear(heads * size, width)
    self.head_size, self.rope_theta = size, config.rope_theta

  def __call__(self, x, positions):
    split = lambda y: y.reshape(*y.shape[:-1], -1, self.head_size)
    q = rope(split(self.q_proj(x)), positions, self.rope_theta)
    k = rope(split(self.k_proj(x)), positions, self.rope_theta)
    # Query head h reads key/value head h // (heads / kv_heads), as transformers'
    # repeat_kv lays them out.
    y = jax.nn.dot_product_attention(q, k, split(self.v_proj(x)), is_causal=True)
    return self.o_proj(y.reshape(*x.shape[:-1], -1))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: LlamaConfig, dtype, param_dtype, rngs: nnx.Rngs):
    width, inner = config.hidden_size, config.intermediate_size
    linear = lambda n_in, n_out: nnx.Linear(n_in, n_out, use_bias=config.mlp_bias, dtype=dtype,
                                            param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = linear(width, inner)
    self.up_proj = linear(width, inner)
    self.down_proj = linear(inner, width)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def _rms_norm(config: LlamaConfig, dtype, param_dtype, rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)


class DecoderLayer(nnx.Module):
  """Pre-norm: x += attention(norm(x)); x += mlp(norm(x))."""

  def __init__(self, config: LlamaConfig, dtype, param_dtype, rngs: nnx.Rngs):
    self.input_layernorm = _rms_norm(config, dtype, param_dtype, rngs)
    self.self_attn = Attention(config, dtype, param_dtype, rngs)
    self.post_attention_layernorm = _rms_norm(config, dtype, param_dtype, rngs)
    self.mlp = MLP(config, dtype, param_dtype, rngs)

  def __call__(self, x, positions):
    x = x + self.self_attn(self.input_layernorm(x), positions)
    return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
  """``LlamaForCausalLM``: ``__call__`` maps (batch, length) tokens to
  (batch, length, vocab) logits."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    self.config = config
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(config, dtype, param_dtype, rngs)
                            for _ in range(config.num_hidden_layers)])
    self.norm = _rms_norm(config, dtype, param_dtype, rngs)
    self.lm_head = (None if config.tie_word_embeddings else
                    nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs))

  def __call__(self, tokens):
    positions = jnp.arange(tokens.shape[-1])
    x = self.embed_tokens(tokens)
    for layer in self.layers:
      x = layer(x, positions)
    x = self.norm(x)
    return self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)


def create(config: LlamaConfig, seed: int = 0, *, dtype: Any = jnp.float32,
           param_dtype: Any = jnp.float32) -> Llama:
  """A randomly initialized Llama (tests; training a small LM from scratch)."""
  return Llama(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)
