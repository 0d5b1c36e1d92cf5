"""Files a run's summary under results/, the data the docs' tables are rendered from.

  python tools/collect_result.py runs/mlp-fm/summary.json mlp_fashion_mnist_baseline
  python tools/render_results.py      # then re-render the docs

The summary is copied as the job wrote it (command, commit, date, machine,
config, figures, table); only its fields are checked, nothing is edited.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
REQUIRED = ("command", "date", "machine", "columns", "rows")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("summary", type=pathlib.Path, help="a run's summary.json")
  parser.add_argument("name", help="results/<name>.json (letters, digits, _ . -)")
  args = parser.parse_args(argv)
  summary = json.loads(args.summary.read_text())
  missing = [k for k in REQUIRED if k not in summary]
  if missing:
    print(f"{args.summary} lacks {missing}; is it a job summary.json?", file=sys.stderr)
    return 1
  if summary.get("commit", "").endswith("+dirty"):
    print(f"warning: {args.summary} was written from uncommitted code "
          f"({summary['commit']}); commit first for a reproducible record.", file=sys.stderr)
  out = ROOT / "results" / f"{args.name}.json"
  out.parent.mkdir(exist_ok=True)
  out.write_text(json.dumps(summary, indent=2) + "\n")
  print(f"wrote {out.relative_to(ROOT)}; now run python tools/render_results.py")
  return 0


if __name__ == "__main__":
  sys.exit(main())
