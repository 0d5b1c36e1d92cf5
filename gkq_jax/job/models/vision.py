"""The seeds' models in flax.linen, and the registry that builds one from a config.

MLPs (LeNet-300-100, the speech MLP), LeNet-5, ResNet-34 (and a tiny ResNet
for tests). :func:`create_model` looks the config's ``model`` up in
:data:`REGISTRY`; add a model by adding an entry.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from gkq_jax.job.models import layers


class MLP(nn.Module):
  """Dense -> ReLU, with BatchNorm + Dropout on every other layer when asked.

  The seed's speech MLP puts Linear -> ReLU -> BatchNorm -> Dropout(0.5) on
  every other hidden layer; ``norm_every=2, dropout=0.5`` gives that layout.
  """

  hidden: Sequence[int] = (300, 100)
  num_classes: int = 10
  norm_every: int = 0  # 0: no BatchNorm / Dropout
  dropout: float = 0.5
  ranks: tuple = ()  # ((layer name, rank), ...): low-rank factorized layers (job/layers.py)
  sparse: tuple = ()  # names of factorized layers with a sparse residual

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      x = nn.relu(layers.dense(width, f"Dense_{i}", self.ranks, self.sparse)(x))
      if self.norm_every and i % self.norm_every == 0:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return layers.dense(self.num_classes, f"Dense_{len(self.hidden)}", self.ranks,
                        self.sparse)(x)


LENET_300_100 = (300, 100)
SPEECH_MLP = (2048, 1950, 1750, 1600, 1400, 1300, 1200, 1000, 800)


class LeNet5(nn.Module):
  """Caffe's LeNet-5 as in Deep Compression: conv20-5, pool, conv50-5, pool, fc500, fc10."""

  num_classes: int = 10
  conv_widths: Sequence[int] = (20, 50)  # filters of the two convs (filter pruning narrows them)
  hidden: int = 500
  ranks: tuple = ()  # ((layer name, rank), ...): low-rank factorized layers (job/layers.py)
  sparse: tuple = ()  # names of factorized Dense layers with a sparse residual

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, width in enumerate(self.conv_widths):
      x = layers.conv(width, (5, 5), f"Conv_{i}", self.ranks, padding="VALID")(x)
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(layers.dense(self.hidden, "Dense_0", self.ranks, self.sparse)(x))
    return layers.dense(self.num_classes, "Dense_1", self.ranks, self.sparse)(x)


def _conv_and_norm(dtype, train: bool):
  """The ResNet's bias-free convolution and its BatchNorm, computing in ``dtype``."""
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype)
  norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                           dtype=dtype)
  return conv, norm


class BasicBlock(nn.Module):
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  mid_filters: int = 0  # width of the inner conv (0: filters); filter pruning narrows it
  ranks: tuple = ()  # ((conv name, rank), ...): low-rank factorized convs (job/layers.py)

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = _conv_and_norm(self.dtype, train)
    y = layers.conv(self.mid_filters or self.filters, (3, 3), "Conv_0", self.ranks,
                    strides=self.strides, use_bias=False, dtype=self.dtype)(x)
    y = nn.relu(norm()(y))
    y = layers.conv(self.filters, (3, 3), "Conv_1", self.ranks, use_bias=False,
                    dtype=self.dtype)(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if x.shape[-1] != self.filters or self.strides != 1:
      x = conv(self.filters, (1, 1), self.strides, name="shortcut")(x)
      x = norm(name="shortcut_norm")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet of basic blocks. ``stem="cifar"``: 3x3 conv, stride 1, no max-pool
  (the seed's ResNet-34); ``stem="imagenet"``: 7x7 stride 2 + max-pool.

  ``dtype`` is the compute type: ``jnp.bfloat16`` runs convolutions and
  activations in bf16 (mixed precision) while parameters, batch statistics
  and logits stay float32, so quantization and the saved file see fp32.
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  num_classes: int = 10
  stem: str = "cifar"
  dtype: Any = jnp.float32
  block_widths: Sequence[int] = ()  # inner width of each block (filter pruning); (): filters
  removed_blocks: Sequence[int] = ()  # indices of identity blocks left out (layer pruning)
  ranks: tuple = ()  # (("BasicBlock_3/Conv_0", rank), ...): low-rank factorized convs

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = _conv_and_norm(self.dtype, train)
    imagenet = self.stem == "imagenet"
    x = conv(self.width, (7, 7) if imagenet else (3, 3), 2 if imagenet else 1, name="stem")(x)
    x = nn.relu(norm(name="stem_norm")(x))
    if imagenet:
      x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    if self.block_widths and len(self.block_widths) != sum(self.stage_sizes):
      raise ValueError(f"block_widths has {len(self.block_widths)} entries for "
                       f"{sum(self.stage_sizes)} blocks.")
    index = 0
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        filters, name = self.width * 2 ** stage, f"BasicBlock_{index}"
        if index not in self.removed_blocks:
          mid = self.block_widths[index] if self.block_widths else 0
          x = BasicBlock(filters, strides, self.dtype, mid, layers.scoped(self.ranks, name),
                         name=name)(x, train)
        elif strides != 1 or x.shape[-1] != filters:
          raise ValueError(f"removed_blocks: {name} changes the shape (stride {strides}, "
                           f"{x.shape[-1]} -> {filters} channels); only identity blocks, "
                           "not the first of a stage, can be removed.")
        index += 1
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def ResNet34(num_classes: int = 10, stem: str = "cifar", width: int = 64,
             dtype: Any = jnp.float32) -> ResNet:
  return ResNet((3, 4, 6, 3), width, num_classes, stem, dtype)


def ResNetTiny(num_classes: int = 10, stem: str = "cifar", dtype: Any = jnp.float32) -> ResNet:
  """Same code path as ResNet-34 at a size that compiles in seconds (tests)."""
  return ResNet((1, 1), 8, num_classes, stem, dtype)


class WideBlock(nn.Module):
  """Pre-activation wide block (Zagoruyko & Komodakis): BN-ReLU-conv, dropout, BN-ReLU-conv."""

  filters: int
  strides: int = 1
  dropout: float = 0.3
  dtype: Any = jnp.float32
  inner: int = 0  # filters of the first conv (filter pruning narrows it); 0: filters

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = _conv_and_norm(self.dtype, train)
    activated = nn.relu(norm()(x))
    y = conv(self.inner or self.filters, (3, 3), self.strides)(activated)
    y = nn.relu(norm()(y))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = conv(self.filters, (3, 3))(y)
    if x.shape[-1] != self.filters or self.strides != 1:
      x = conv(self.filters, (1, 1), self.strides, name="shortcut")(activated)
    return x + y


class WideResNet(nn.Module):
  """WRN-depth-widen for 32x32 inputs: Deep k-Means' CIFAR-10 model is WRN-16-4
  with dropout 0.3 (2.7 M parameters): a 3x3 conv of 16, three groups of
  (depth - 4) / 6 wide blocks of 16, 32, 64 x widen filters, BN-ReLU, pool, Dense."""

  depth: int = 16
  widen: int = 4
  num_classes: int = 10
  dropout: float = 0.3
  dtype: Any = jnp.float32
  block_widths: Sequence[int] = ()  # inner width of each block (filter pruning); (): filters

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f"config.wrn.depth={self.depth}: a WRN's depth is 6 n + 4 (10, 16, 22, "
                       "28, ...).")
    conv, norm = _conv_and_norm(self.dtype, train)
    x = conv(16, (3, 3), name="stem")(x)
    index = 0
    for group, width in enumerate((16 * self.widen, 32 * self.widen, 64 * self.widen)):
      for block in range((self.depth - 4) // 6):
        strides = 2 if group > 0 and block == 0 else 1
        inner = self.block_widths[index] if self.block_widths else 0
        x = WideBlock(width, strides, self.dropout, self.dtype, inner)(x, train)
        index += 1
    x = nn.relu(norm(name="final_norm")(x))
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


# ------------------------------------------------------------------ registry


def _compute_dtype(config):
  name = config.resnet.dtype
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"config.resnet.dtype={name!r}: use 'float32' or 'bfloat16' "
                     "(mixed precision: bf16 compute, fp32 parameters).")
  return jnp.dtype(name)


REGISTRY: dict[str, Callable[[Any, int], nn.Module]] = {
    "mlp": lambda c, n: MLP(tuple(c.mlp.hidden), n, c.mlp.norm_every, c.mlp.dropout),
    "lenet5": lambda c, n: LeNet5(n),
    "resnet34": lambda c, n: ResNet34(n, c.resnet.stem, c.resnet.width, _compute_dtype(c)),
    "resnet_tiny": lambda c, n: ResNetTiny(n, c.resnet.stem, _compute_dtype(c)),
    "wrn": lambda c, n: WideResNet(c.wrn.depth, c.wrn.widen, n, c.wrn.dropout,
                                   _compute_dtype(c)),
}


def create_model(config, num_classes: int) -> nn.Module:
  """The model ``config.model`` names, for ``num_classes`` outputs."""
  if config.model not in REGISTRY:
    raise ValueError(f"config.model={config.model!r} is not one of {tuple(REGISTRY)}.")
  return REGISTRY[config.model](config, num_classes)
