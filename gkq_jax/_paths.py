"""Leaves of a pytree named by '/'-joined paths: the names rules match and files store."""

from __future__ import annotations

from typing import Any, Callable

import jax


def path_string(key_path) -> str:
  """'/'-joined keys of a pytree key path; nnx's trailing '.value' is dropped."""
  names = []
  for key in key_path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    else:
      names.append(str(getattr(key, "key", key)))
  if names and names[-1] == "value":
    names.pop()
  return "/".join(names)


def path_keys(key_path) -> tuple:
  """The keys of a pytree key path as plain values (str or int, unlike
  :func:`path_string`, which cannot tell key "a/b" from a -> b); nnx's trailing
  '.value' is dropped, so a State of Variables, its pure dict and a pure State
  give the same keys."""
  keys = []
  for key in key_path:
    if isinstance(key, jax.tree_util.DictKey):
      keys.append(key.key)
    elif isinstance(key, jax.tree_util.GetAttrKey):
      keys.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      keys.append(key.idx)
    else:
      keys.append(getattr(key, "key", key))
  if keys and keys[-1] == "value" and isinstance(key_path[-1], jax.tree_util.GetAttrKey):
    keys.pop()
  return tuple(keys)


def named_leaves(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
  """(path string, leaf) of every leaf of ``tree``, in tree order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_string(p), leaf) for p, leaf in flat]


def map_with_paths(fn: Callable[[str, Any], Any], tree: Any,
                   is_leaf: Callable[[Any], bool] | None = None) -> Any:
  """``jax.tree.map`` whose function also gets each leaf's path string."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_string(p), x), tree,
                                          is_leaf=is_leaf)
