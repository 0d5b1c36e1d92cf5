"""Which parameters are clustered, and into how many shared values.

A rule is a regular expression searched in a parameter's path, written with
'/' between keys (``params/Conv_0/kernel`` for linen, ``conv1/kernel`` for an
``nnx.split`` state). The first matching rule decides; ``num_clusters=0``
keeps matched parameters as they are.

A rule may also say how its parameters' axes are read (see
:mod:`gkq_jax.axes`): ``channel_axes``, how many trailing axes are the layer's
output features (one codebook per output feature with
``granularity="channel"``), and ``stacked_axes``, how many leading axes stack
layers (``nn.scan``; each layer's slice clustered on its own). Left at None,
they come from ``quantize(..., axes=gkq.layer_axes(model, ...))`` or default to
one output axis and no stack.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Sequence

import numpy as np

from gkq_jax._paths import map_with_paths, named_leaves

MAX_CLUSTERS = 65536


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class ClusterRule:
  pattern: str = r"(^|/)kernel$"
  num_clusters: int = 16
  min_ndim: int = 2  # biases and norm scales (ndim 1) stay exact by default
  channel_axes: int | None = None  # trailing axes that are the layer's outputs
  stacked_axes: int | None = None  # leading axes that stack layers

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"rule pattern {self.pattern!r} is not a valid regex: {e}") from e
    if not _is_int(self.num_clusters) or not 0 <= self.num_clusters <= MAX_CLUSTERS:
      raise ValueError(f"rule {self.pattern!r}: num_clusters must be an integer in "
                       f"1..{MAX_CLUSTERS} (or 0 to skip), got {self.num_clusters!r}.")
    if not _is_int(self.min_ndim):
      raise ValueError(f"rule {self.pattern!r}: min_ndim must be an integer, "
                       f"got {self.min_ndim!r}.")
    for name, low in (("channel_axes", 1), ("stacked_axes", 0)):
      value = getattr(self, name)
      if value is not None and (not _is_int(value) or value < low):
        raise ValueError(f"rule {self.pattern!r}: {name} must be None or an integer >= {low}, "
                         f"got {value!r}.")


DEFAULT_RULES = (ClusterRule(),)


def bits_rule(pattern: str, bits: int, min_ndim: int = 2, **axes) -> ClusterRule:
  """A rule with 2**bits clusters; bits must be an integer in 1..16. ``axes``:
  ``channel_axes`` / ``stacked_axes`` as in :class:`ClusterRule`."""
  if not _is_int(bits) or not 1 <= bits <= 16:
    raise ValueError(f"bits must be in 1..16 and an integer, got {bits!r}.")
  return ClusterRule(pattern, 2 ** int(bits), min_ndim, **axes)


def rule_for(rules: Sequence[ClusterRule], path: str) -> ClusterRule | None:
  """The first rule whose pattern is found in ``path`` (None if none)."""
  for rule in rules:
    if re.search(rule.pattern, path):
      return rule
  return None


def clusters_for(rules: Sequence[ClusterRule], path: str, leaf) -> int:
  """Number of clusters the first matching rule gives this leaf (0: leave it alone)."""
  rule = rule_for(rules, path)
  if rule is None:
    return 0
  return rule.num_clusters if getattr(leaf, "ndim", 0) >= rule.min_ndim else 0


def selected_leaves(params: Any, rules: Sequence[ClusterRule]) -> Any:
  """A pytree of bools like ``params``: True where the rules cluster the leaf."""
  return map_with_paths(lambda path, leaf: clusters_for(rules, path, leaf) > 0, params)


def check_rules(params: Any, rules: Sequence[ClusterRule]) -> None:
  """Raises if a rule matches no parameter path: almost always a typo.

  Warns (once per rule) about a rule that matches parameters but decides none
  of them, because an earlier rule matches every one of them first (the first
  match wins): ``[bits_rule("kernel$", 2), bits_rule("Dense_0/kernel$", 4)]``
  gives Dense_0 4 values, not 16. Put the narrower rule first.
  """
  paths = [path for path, _ in named_leaves(params)]
  for i, rule in enumerate(rules):
    matched = [p for p in paths if re.search(rule.pattern, p)]
    if not matched:
      sample = ", ".join(paths[:6])
      raise ValueError(f"rule {rule.pattern!r} matches no parameter. Paths look like: "
                       f"{sample}{', ...' if len(paths) > 6 else ''}")
    deciding = [rule_for(rules[:i], p) for p in matched]
    if all(r is not None for r in deciding):
      warnings.warn(
          f"rule {rule.pattern!r} (rule {i}) never applies: the earlier rule "
          f"{deciding[0].pattern!r} (rule {rules.index(deciding[0])}) matches all of its "
          f"{len(matched)} parameter(s) (e.g. {matched[0]!r}) and the first match wins; put "
          f"{rule.pattern!r} first or narrow {deciding[0].pattern!r}.", stacklevel=3)
