"""A benchmark's results summary for results/*.json (rendered into docs/ by
tools/render_results.py): the command, commit, date and machine around its table."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys


def write(path: str, columns, rows, **fields) -> None:
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip() or None
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  summary = {
      "command": "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
      "commit": commit,
      "date": datetime.date.today().isoformat(),
      "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}; load average {load:.1f} "
                 "when written)",
      **fields,
      "columns": list(columns),
      "rows": [list(r) for r in rows],
  }
  with open(path, "w") as f:
    f.write(json.dumps(summary, indent=1) + "\n")
  print(f"\nwrote {path}")
