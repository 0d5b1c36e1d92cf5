"""Peak memory mappings of one long study, with and without releasing compiled programs.

Every XLA CPU executable keeps a few memory mappings of its own; past the
kernel's limit (vm.max_map_count, 65,530 by default) XLA crashes. The job
releases compiled programs between the methods of its studies
(:func:`gkq_jax.job.context.release_compiled`). This runs a shipped study
config at a small size twice, each in a fresh process: once as the job runs
it, once with the release turned into a no-op, and prints the peak number of
lines of /proc/self/maps of each (sampled every 20 ms and at every release).

  python tools/map_count.py                                 # the MLP survey, small
  python tools/map_count.py --config configs/mlp.py:equal_bytes_fashion_mnist \\
      --set equal_bytes.bits='(2,)'

Not part of the test suite (``pytest`` never collects this file).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The 14 methods of the MLP survey (gkq, low-rank, pruning, distillation, QAT, binary and
# combinations) on the bundled digits, one epoch each at one learning rate: the study with
# the most distinct programs among the shipped configs, in about two minutes per run.
DEFAULT_CONFIG = "configs/mlp.py:survey_fashion_mnist"
SMALL = ("dataset='digits'", "num_epochs=1", "validation_size=200", "log_every=1000",
         "survey.epochs=1", "survey.learning_rates=(1e-3,)", "survey.student_epochs=1",
         "survey.latency_repeats=2", "survey.latency_batches=(1, 16)",
         "equal_bytes.finetune_epochs=1", "compare.finetune_epochs=1")


def map_count() -> int:
  with open("/proc/self/maps") as f:
    return sum(1 for _ in f)


def load_config(spec: str, settings):
  path, _, variant = spec.partition(":")
  module = importlib.import_module(pathlib.Path(path).with_suffix("").as_posix().replace("/", "."))
  config = module.get_config(variant)
  for setting in settings:
    key, _, text = setting.partition("=")
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = getattr(node, parent)
    if hasattr(node, name):  # a setting of another mode's section is skipped with its mode
      setattr(node, name, ast.literal_eval(text))
  return config


def child(spec: str, settings, release: bool) -> None:
  """Runs the study in this process; prints {"peak": ..., "seconds": ...} as its last line."""
  sys.path.insert(0, str(ROOT))
  from gkq_jax.job import context
  from gkq_jax.job import run as run_lib

  peak, releases, done = [map_count()], [0], threading.Event()

  def sample():
    while not done.wait(0.02):
      peak[0] = max(peak[0], map_count())

  real = context.release_compiled

  def counted():
    peak[0] = max(peak[0], map_count())  # just before the release: the study's high-water mark
    releases[0] += 1
    if release:
      real()

  context.release_compiled = counted
  config = load_config(spec, settings)
  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="map_count-") as workdir:
    run_lib.run(config, workdir, command="tools/map_count.py")
  done.set()
  thread.join()
  peak[0] = max(peak[0], map_count())
  print(json.dumps({"peak": peak[0], "releases": releases[0],
                    "seconds": round(time.perf_counter() - start, 1)}))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="config file[:variant]")
  parser.add_argument("--set", action="append", default=[],
                      help="extra setting key=python literal (after the small-size ones)")
  parser.add_argument("--child", choices=("release", "keep"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  settings = list(SMALL) + args.set
  if args.child:
    child(args.config, settings, args.child == "release")
    return 0
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  results = {}
  for mode in ("release", "keep"):
    out = subprocess.run([sys.executable, __file__, "--config", args.config, "--child", mode,
                          *sum((["--set", s] for s in args.set), [])],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
      print(out.stderr[-3000:], file=sys.stderr)
      return out.returncode
    results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
  limit = int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
  print(f"{args.config} at a small size ({', '.join(settings)}):")
  for mode, label in (("release", "with the release (as the job runs)"),
                      ("keep", "without it (release_compiled a no-op)")):
    r = results[mode]
    print(f"  peak mappings {label}: {r['peak']:,} ({r['releases']} release points, "
          f"{r['seconds']} s)")
  print(f"  the kernel's limit here (vm.max_map_count): {limit:,}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
