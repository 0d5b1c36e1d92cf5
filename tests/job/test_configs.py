"""The shipped configs and their variants: each one builds its model and names valid settings.

Nothing is trained: the models are initialised abstractly (``jax.eval_shape``),
so even the 10 M-parameter speech MLP and ResNet-34 cost milliseconds.
"""

import importlib
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest

import gkq_jax as gkq
from configs import default
from gkq_jax.job import context, models
from gkq_jax.job import run as run_lib

# Input shape of one example for each dataset the configs name.
ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE_SHAPES = {"digits": (8, 8, 1), "tfds:fashion_mnist": (28, 28, 1),
                 "tfds:cifar10": (32, 32, 3), "tfds:imagenet2012": (224, 224, 3)}

VARIANTS = [("mlp", ""), ("mlp", "fashion_mnist"), ("mlp", "dc_fashion_mnist"),
            ("mlp", "compare_fashion_mnist"), ("mlp", "speech"), ("mlp", "smoke"),
            ("lenet5", ""), ("lenet5", "fashion_mnist"), ("lenet5", "smoke"),
            ("resnet34", ""), ("resnet34", "cifar10"), ("resnet34", "imagenet"),
            ("resnet34", "survey_cifar10"), ("resnet34", "smoke"),
            ("mlp", "survey_fashion_mnist"), ("mlp", "obd_fashion_mnist"),
            ("mlp", "equal_bytes_fashion_mnist"), ("lenet5", "survey_fashion_mnist"),
            ("lenet5", "obd_fashion_mnist"), ("wrn16_4", ""), ("wrn16_4", "cifar10"),
            ("wrn16_4", "smoke")]


def flat_keys(config, prefix=""):
  keys = set()
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys |= flat_keys(value, f"{prefix}{name}.")
    else:
      keys.add(prefix + name)
  return keys


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_variant_builds_its_model_with_valid_settings(name, variant):
  config = importlib.import_module(f"configs.{name}").get_config(variant)
  # A field the defaults lack is a typo that would otherwise be silently ignored.
  # survey.student holds model fields of the student (free-form by design).
  keys = {k for k in flat_keys(config) if not k.startswith("survey.student.")}
  assert keys <= flat_keys(default.get_config())
  assert config.mode in run_lib.MODES
  q = config.quantize
  assert q.importance in gkq.IMPORTANCE_KINDS and q.granularity in gkq.GRANULARITIES
  assert q.method in gkq.KMEANS_METHODS and q.init in gkq.KMEANS_INITS
  assert q.objective in gkq.KMEANS_OBJECTIVES
  assert config.finetune.reduce in ("mean", "sum")
  shape = SAMPLE_SHAPES[config.dataset]
  if config.image_size:
    shape = (config.image_size, config.image_size, shape[2])
  model = models.create_model(config, 1000 if "imagenet" in config.dataset else 10)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape)))
  run_lib.check_config(config)  # what the job checks before it loads data or trains
  run_lib.check_model(config, model, shape)
  # The quantize rules (extra "regex=bits" entries first) each match a parameter.
  rules = context.cluster_rules(config)
  gkq.check_rules(variables["params"], rules)
  assert any(use for _, use in gkq.named_leaves(gkq.selected_leaves(variables["params"], rules)))


def test_quantize_rules_entries_come_before_the_default_bits():
  # Deep Compression's setting: 5 bits for the 784x300 layer, the default 4 elsewhere.
  config = importlib.import_module("configs.mlp").get_config("dc_fashion_mnist")
  model = models.create_model(config, 10)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1))))
  rules = context.cluster_rules(config)
  ks = {p: gkq.clusters_for(rules, p, leaf) for p, leaf in gkq.named_leaves(params["params"])}
  assert ks == {"Dense_0/kernel": 32, "Dense_0/bias": 0, "Dense_1/kernel": 16,
                "Dense_1/bias": 0, "Dense_2/kernel": 16, "Dense_2/bias": 0}
  config.quantize.rules = ("Dense_0/kernel$:5",)
  with pytest.raises(ValueError, match=r"quantize.rules entry 'Dense_0/kernel\$:5' must look like"):
    context.cluster_rules(config)


def test_cluster_biases_adds_a_bias_rule_that_pruning_leaves_out():
  config = importlib.import_module("configs.mlp").get_config("smoke")
  model = models.create_model(config, 10)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))))
  bias = params["params"]["Dense_0"]["bias"]
  assert gkq.clusters_for(context.cluster_rules(config), "Dense_0/bias", bias) == 0
  config.quantize.cluster_biases = True
  rules = context.cluster_rules(config)
  assert gkq.clusters_for(rules, "Dense_0/bias", bias) == 2 ** config.quantize.bits
  prunable = [r for r in rules if r.pattern != context.BIAS_PATTERN]
  assert gkq.clusters_for(prunable, "Dense_0/bias", bias) == 0


# Every "--config.x=..." an error message of the job suggests, parsed by the same flag
# parser main.py uses, on a shipped config: a suggestion that fails as a flag is a bug.
_SUGGESTION = re.compile(r"--config\.([a-z_.]+)(?:=('[^']*'|[^\s\"'),]+)|\s*\(e\.g\. ([^)]+)\))?")


def _suggestions():
  found = set()
  for path in sorted((ROOT / "gkq_jax" / "job").rglob("*.py")):
    for key, value, example in _SUGGESTION.findall(path.read_text()):
      value = re.sub(r"\{[^}]*\}", "32", value or example or "").replace('\\"', '"')
      found.add((key, value.strip("'")))
  return sorted(found)


@pytest.mark.parametrize("key,value", _suggestions())
def test_every_flag_an_error_suggests_works(key, value):
  from absl import flags
  from ml_collections import config_flags

  argv = ["main.py", f"--config={ROOT / 'configs' / 'mlp.py'}"]
  if value and "<" not in value:
    argv.append(f"--config.{key}={value}")
  names = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=names, lock_config=True,
                                  sys_argv=argv)
  names(argv)
  config = names.config
  for part in key.split("."):  # the field exists (with no value given: it is named)
    config = getattr(config, part)


def test_survey_mode_passes_its_checks_on_every_shipped_config():
  for name, variant in VARIANTS:
    config = importlib.import_module(f"configs.{name}").get_config(variant)
    config.mode = "survey"
    shape = SAMPLE_SHAPES[config.dataset]
    if config.image_size:
      shape = (config.image_size, config.image_size, shape[2])
    run_lib.check_config(config)
    run_lib.check_model(config, models.create_model(config, 10), shape)
