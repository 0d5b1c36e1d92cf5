"""Renders the results tables of the docs from the committed summaries in results/.

Every table of results in ``docs/`` sits between two markers::

    <!-- results:NAME -->
    ... generated, do not edit ...
    <!-- /results:NAME -->

and is rendered from ``results/NAME.json``, a run's summary: the command that
produced it, the git commit, the date and machine, the config, and its table
(``columns`` and ``rows``; numbers formatted by ``formats``, a {column: format
spec} map). The job writes such a summary for every run (``summary.json`` in
its workdir); ``tools/collect_result.py`` files one under ``results/``.

  python tools/render_results.py           # rewrite the tables in docs/
  python tools/render_results.py --check   # exit 1, naming them, if any is stale

``tests/test_docs.py`` runs the check, so a summary changed without
re-rendering the docs fails the suite; no figure in the docs is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(<!-- results:([\w.-]+) -->\n)(.*?)(<!-- /results:\2 -->)", re.S)


def _cell(value, spec: str | None) -> str:
  if value is None:
    return "-"
  if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
    return format(value, spec)
  return str(value)


def render(summary: dict) -> str:
  """The markdown of one summary: its table, then the command and provenance."""
  columns, formats = summary["columns"], summary.get("formats", {})
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in summary["rows"]:
    if len(row) != len(columns):
      raise ValueError(f"{summary.get('name')}: a row of {len(row)} cells for "
                       f"{len(columns)} columns: {row}")
    lines.append("| " + " | ".join(_cell(v, formats.get(c)) for c, v in zip(columns, row))
                 + " |")
  lines.append("")
  commands = summary["command"] if isinstance(summary["command"], list) else [summary["command"]]
  lines += ["```bash", *commands, "```", ""]
  date = summary.get("date") or "not recorded"
  when = f"on {date}" if date != "not recorded" else "(date not recorded)"
  provenance = f"Measured {when} on {summary.get('machine') or 'a machine not recorded'}"
  commit = summary.get("commit")
  provenance += f" at commit `{commit}`" if commit else ""
  if summary.get("source"):
    provenance += f"; {summary['source']}"
  lines.append(provenance + f" (`results/{summary['name']}.json`).")
  return "\n".join(lines) + "\n"


def load_summaries() -> dict[str, dict]:
  out = {}
  for path in sorted(RESULTS.glob("*.json")):
    summary = json.loads(path.read_text())
    summary["name"] = path.stem
    out[path.stem] = summary
  return out


def rendered_pages() -> dict[pathlib.Path, tuple[str, str]]:
  """{page: (its text now, its text with every table rendered)}."""
  summaries = load_summaries()
  pages = {}
  for page in sorted(DOCS.rglob("*.md")):
    if "_build" in page.parts:
      continue
    text = page.read_text()

    def fill(match):
      name = match.group(2)
      if name not in summaries:
        raise ValueError(f"{page.relative_to(ROOT)} wants results/{name}.json, which does "
                         "not exist.")
      return match.group(1) + render(summaries[name]) + match.group(4)

    new = BLOCK.sub(fill, text)
    if new != text or BLOCK.search(text):
      pages[page] = (text, new)
  return pages


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="fail if a table is stale")
  args = parser.parse_args(argv)
  stale = [page for page, (old, new) in rendered_pages().items() if old != new]
  if args.check:
    for page in stale:
      print(f"stale results table in {page.relative_to(ROOT)}: run "
            "python tools/render_results.py", file=sys.stderr)
    return 1 if stale else 0
  for page in stale:
    page.write_text(rendered_pages()[page][1])
    print(f"rendered {page.relative_to(ROOT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
