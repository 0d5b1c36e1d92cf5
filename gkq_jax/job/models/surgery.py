"""Model surgery for the survey's structured methods: which layers' outputs
structured pruning may cut (and the narrower model that results), which ResNet
blocks can be removed, and the BatchNorm factors QAT folds into convs.

Each plan knows one of the job's model classes; a new model that the survey's
structured methods should take gets its plan here.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

import gkq_jax as gkq
from gkq_jax.job.models import vision as models


def channel_groups(model: nn.Module) -> list[tuple[gkq.ChannelGroup, str, Callable]]:
  """(group, "conv" or "dense", narrower(model, n) -> model) for each layer whose
  outputs structured pruning may cut, in forward order."""
  if isinstance(model, models.MLP):
    plans, norm = [], 0
    for i in range(len(model.hidden)):
      norms = ()
      if model.norm_every and i % model.norm_every == 0:
        norms, norm = (f"BatchNorm_{norm}",), norm + 1
      narrower = (lambda i: lambda m, n: m.clone(
          hidden=tuple(n if j == i else w for j, w in enumerate(m.hidden))))(i)
      plans.append((gkq.ChannelGroup(f"Dense_{i}", f"Dense_{i + 1}", norms), "dense", narrower))
    return plans
  if isinstance(model, models.LeNet5):
    conv = lambda i: lambda m, n: m.clone(conv_widths=tuple(
        n if j == i else w for j, w in enumerate(m.conv_widths)))
    return [(gkq.ChannelGroup("Conv_0", "Conv_1"), "conv", conv(0)),
            (gkq.ChannelGroup("Conv_1", "Dense_0"), "conv", conv(1)),
            (gkq.ChannelGroup("Dense_0", "Dense_1"), "dense", lambda m, n: m.clone(hidden=n))]
  if isinstance(model, models.ResNet):
    plans = []
    for k in _present_blocks(model):
      block = f"BasicBlock_{k}"
      narrower = (lambda k: lambda m, n: m.clone(block_widths=tuple(
          n if j == k else w for j, w in enumerate(_block_widths(m)))))(k)
      plans.append((gkq.ChannelGroup(f"{block}/Conv_0", f"{block}/Conv_1",
                                     f"{block}/BatchNorm_0"), "conv", narrower))
    return plans
  if isinstance(model, models.WideResNet):
    widths = _wide_widths(model)
    blocks = len(widths)
    plans = []
    for k in range(blocks):
      narrower = (lambda k: lambda m, n: m.clone(block_widths=tuple(
          n if j == k else w for j, w in enumerate(tuple(m.block_widths) or widths))))(k)
      # Pre-activation: the first conv's outputs pass BatchNorm_1 on their way to Conv_1.
      plans.append((gkq.ChannelGroup(f"WideBlock_{k}/Conv_0", f"WideBlock_{k}/Conv_1",
                                     f"WideBlock_{k}/BatchNorm_1"), "conv", narrower))
    return plans
  raise ValueError(f"structured pruning has no plan for {type(model).__name__}.")


def _wide_widths(model) -> tuple:
  """Inner width of every block of a WideResNet."""
  per_group = (model.depth - 4) // 6
  return tuple(model.block_widths) or tuple(
      w * model.widen for w in (16, 32, 64) for _ in range(per_group))


def _block_filters(model) -> list[int]:
  return [model.width * 2 ** s for s, n in enumerate(model.stage_sizes) for _ in range(n)]


def _block_widths(model) -> tuple:
  return tuple(model.block_widths) or tuple(_block_filters(model))


def _present_blocks(model) -> list[int]:
  return [k for k in range(sum(model.stage_sizes)) if k not in model.removed_blocks]


def removable_blocks(model: nn.Module) -> list[int]:
  """Blocks whose input and output shapes agree, so the shortcut alone can carry
  the signal when they are gone (not the first block of a later stage)."""
  if not isinstance(model, models.ResNet):
    raise ValueError("survey method remove_blocks needs a ResNet model (config.model "
                     f"resnet34 / resnet_tiny), not {type(model).__name__}.")
  out, index, channels = [], 0, model.width
  for stage, blocks in enumerate(model.stage_sizes):
    for block in range(blocks):
      filters = model.width * 2 ** stage
      if (stage == 0 or block > 0) and channels == filters and index not in model.removed_blocks:
        out.append(index)
      channels, index = filters, index + 1
  return out


def fold_scales(model: nn.Module, variables: dict) -> dict:
  """kernel path -> the BatchNorm factor applied right after it (ResNets), for
  QAT with folded BatchNorm; empty for models without conv -> BatchNorm pairs."""
  if not isinstance(model, models.ResNet) or "batch_stats" not in variables:
    return {}
  pairs = [("stem", "stem_norm")]
  for k in _present_blocks(model):
    b = f"BasicBlock_{k}"
    pairs += [(f"{b}/Conv_0", f"{b}/BatchNorm_0"), (f"{b}/Conv_1", f"{b}/BatchNorm_1"),
              (f"{b}/shortcut", f"{b}/shortcut_norm")]
  out = {}
  for conv, norm in pairs:
    layer = subtree(variables["params"], conv)
    scale, stats = subtree(variables["params"], norm), subtree(variables["batch_stats"], norm)
    if layer is None or "kernel" not in layer or scale is None or stats is None:
      continue  # a block without a shortcut conv, or a factorized conv
    out[f"{conv}/kernel"] = gkq.batchnorm_scale(scale["scale"], stats["var"])
  return out


def subtree(tree, path: str):
  """The sub-tree at a '/'-joined path, or None."""
  for key in path.split("/"):
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def half_width(model: nn.Module) -> dict:
  """The model fields of the same model at half width (at least 1 unit per
  layer): the survey's default distillation student."""
  half = lambda n: max(1, int(n) // 2)  # noqa: E731
  if isinstance(model, models.MLP):
    return {"hidden": tuple(half(w) for w in model.hidden)}
  if isinstance(model, models.LeNet5):
    return {"conv_widths": tuple(half(w) for w in model.conv_widths), "hidden": half(model.hidden)}
  if isinstance(model, models.ResNet):
    return {"width": half(model.width), "block_widths": tuple(half(w) for w in
                                                              model.block_widths)}
  if isinstance(model, models.WideResNet):
    if model.widen > 1:
      return {"widen": half(model.widen), "block_widths": tuple(half(w) for w in
                                                                model.block_widths)}
    # widen 1: the blocks' inner convs at half width.
    return {"block_widths": tuple(half(w) for w in _wide_widths(model))}
  raise ValueError(f"no smaller student for this {type(model).__name__}; set survey.student's "
                   "fields (the student's model fields) in the config.")
