"""gkq_jax command line: python main.py --config=configs/resnet34.py [--workdir=runs/x]."""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from gkq_jax.job import run as run_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/resnet34.py:cifar10.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the report go "
                    "(default: runs/<config name>). Rerun with the same one to resume.")
flags.mark_flags_as_required(["config"])


class _OnlyWarningsFromOrbax(logging.Filter):
  """orbax logs every checkpoint step at INFO; keep the progress lines readable."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").addFilter(_OnlyWarningsFromOrbax())
  config_path = config_flags.get_config_filename(FLAGS["config"])
  try:
    run_lib.run(FLAGS.config, FLAGS.workdir or run_lib.default_workdir(config_path))
  except (ValueError, FloatingPointError) as e:  # bad input: one line that says what to fix
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
