"""Sphinx configuration: MyST Markdown pages, the API reference generated from
the docstrings of everything in ``gkq_jax.__all__``, the command-line configs
listed from their own docstrings. Built with warnings as errors by ``.ci/run``:

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "docs" / "_ext")]

import gkq_jax  # noqa: E402

project = "gkq_jax"
author = "the gkq_jax authors"
copyright = "2026, the gkq_jax authors"  # noqa: A001
release = version = gkq_jax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "gkq_docs",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_ext", "README.md"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
suppress_warnings = ["myst.header"]

html_theme = "sphinx_book_theme"
html_title = "gkq_jax"
html_theme_options = {"repository_url": "https://github.com/gkq-jax/gkq_jax",
                      "use_repository_button": False, "show_toc_level": 2}
