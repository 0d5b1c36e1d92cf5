"""The library stands alone: importing it pulls in none of the job's packages."""

import pathlib
import subprocess
import sys

import gkq_jax

JOB_PACKAGES = ("orbax", "ml_collections", "tensorflow_datasets", "tensorflow", "grain",
                "sklearn", "matplotlib", "PIL")


def test_library_modules_import_none_of_the_jobs_packages():
  root = pathlib.Path(gkq_jax.__file__).parent
  modules = sorted("gkq_jax." + p.stem for p in root.glob("*.py") if p.stem != "__init__")
  assert "gkq_jax.quantize" in modules and len(modules) >= 10
  script = ("import sys\n"
            f"for m in {['gkq_jax'] + modules!r}: __import__(m)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {JOB_PACKAGES!r}))\n"
            "print(sorted(m for m in sys.modules if m.startswith('gkq_jax.job')))")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""}).stdout.splitlines()
  assert out == ["[]", "[]"]


def test_public_names_are_the_exports():
  public = sorted(n for n in dir(gkq_jax) if not n.startswith("_")
                  and not _is_module(getattr(gkq_jax, n)))
  assert sorted(gkq_jax.__all__) == sorted(public + ["__version__"])
  assert gkq_jax.__version__.count(".") == 2


def _is_module(x):
  return type(x).__name__ == "module"
