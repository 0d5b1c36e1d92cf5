"""Two directives that keep the docs generated from the code:

``{gkq-api}``      every name in ``gkq_jax.__all__``, grouped by the module that
                   defines it, documented from its docstring (autodoc);
``{gkq-configs}``  every ``configs/*.py`` of the command-line job, from its module
                   docstring (which lists its variants) and ``get_config``'s.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _kind(obj) -> str:
  if inspect.isclass(obj):
    return "autoclass"
  if callable(obj):
    return "autofunction"
  return "autodata"


def api_groups() -> dict[str, list[str]]:
  """{defining module: [public names]} in __all__ order (constants under their module)."""
  import gkq_jax

  groups: dict[str, list[str]] = {}
  for name in gkq_jax.__all__:
    if name.startswith("__"):
      continue
    obj = getattr(gkq_jax, name)
    module = getattr(obj, "__module__", None) if (inspect.isclass(obj) or callable(obj)) else None
    if not module or not module.startswith("gkq_jax"):
      module = "constants"
    groups.setdefault(module, []).append(name)
  return groups


class _Generated(SphinxDirective):
  has_content = False

  def _parse(self, lines: list[str]) -> list[nodes.Node]:
    holder = nodes.section() if self._titles else nodes.container()
    content = StringList(lines, source="generated")
    if self._titles:
      nested_parse_with_titles(self.state, content, holder)
    else:
      self.state.nested_parse(content, 0, holder)
    return holder.children

  _titles = True


class ApiDirective(_Generated):
  def run(self):
    import gkq_jax

    # The page is MyST Markdown, so the generated content is too; autodoc writes
    # reStructuredText, so its directives sit in eval-rst blocks.
    lines = []
    for module, names in api_groups().items():
      lines += [f"## `{module}`" if module != "constants" else "## Option values", ""]
      if module != "constants":
        doc = inspect.getdoc(importlib.import_module(module)) or ""
        first = doc.split("\n\n")[0].replace("\n", " ")
        if first:
          lines += ["```{eval-rst}", first, "```", ""]
      for name in names:
        obj = getattr(gkq_jax, name)
        if module == "constants":
          lines += [f"```{{py:data}} gkq_jax.{name}", f":value: {obj!r}", "```", ""]
          continue
        lines += ["```{eval-rst}", f".. {_kind(obj)}:: gkq_jax.{name}", "```", ""]
    return self._parse(lines)


class ConfigsDirective(_Generated):
  def run(self):
    lines = []
    for path in sorted((ROOT / "configs").glob("*.py")):
      if path.stem.startswith("_"):
        continue
      module = importlib.import_module(f"configs.{path.stem}")
      lines += [f"## `configs/{path.name}`", "", "```{eval-rst}"]
      lines += (inspect.getdoc(module) or "(no docstring)").splitlines() + ["```", ""]
    return self._parse(lines)


def setup(app):
  app.add_directive("gkq-api", ApiDirective)
  app.add_directive("gkq-configs", ConfigsDirective)
  return {"parallel_read_safe": True}
