"""gkq_jax command line: python main.py --config=configs/resnet34.py [--workdir=runs/x]."""

from absl import app, flags
from ml_collections import config_flags

from gkq_jax import run as run_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/resnet34.py:cifar10.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the report go "
                    "(default: runs/<config name>). Rerun with the same one to resume.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config_path = config_flags.get_config_filename(FLAGS["config"])
  run_lib.run(FLAGS.config, FLAGS.workdir or run_lib.default_workdir(config_path))


if __name__ == "__main__":
  app.run(main)
