"""An offline code-search retrieval task for sentence-embedding models, from the standard library.

A compressed embedding model (MiniLM, all-MiniLM-L6-v2) is judged by whether it still finds
the right text, and its training mixture holds code-search pairs (docstring -> code), so
pairs read from the running Python's own ``.py`` files (:mod:`.text` lists them) make a
meaningful task that needs no download:

  * query: the first paragraph of a function's or method's docstring, whitespace collapsed,
    cut at a word boundary after ``max_query_chars``; docstrings under ``min_words`` words are
    dropped (``Return self.``);
  * document: its ``def`` line with the signature, as ``ast`` reads it back
    (``def urljoin(base, url, allow_fragments=True):``).

Identical queries or documents are ambiguous targets, so only the first pair (sorted path,
then source line) with a given query or document is kept. Calibration pairs (what a
quantizer may look at) and evaluation pairs come from DISJOINT files: files are ordered by a
seeded permutation, the first ones give the calibration pool until it is large enough, the
rest the evaluation pool, and each pool is sampled down to its size with the same seed.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import platform
import re

import numpy as np

from gkq_jax.job.data import text as text_lib
from gkq_jax.job.data.images import DataError


@dataclasses.dataclass(frozen=True)
class Pair:
  """One query (docstring) and its one correct document (def line), and where they are."""

  query: str
  document: str
  path: str  # relative to the standard-library folder
  lineno: int


def first_paragraph(docstring: str, max_chars: int = 256) -> str:
  """The docstring's first paragraph on one line, cut at a word boundary after ``max_chars``."""
  paragraph = inspect.cleandoc(docstring).strip().split("\n\n")[0]
  line = re.sub(r"\s+", " ", paragraph).strip()
  if len(line) > max_chars:
    line = line[:max_chars + 1].rsplit(" ", 1)[0]
  return line


def def_line(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
  """``def name(args) -> ret:`` of a function node (decorators and body left out)."""
  keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
  returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
  return f"{keyword} {node.name}({ast.unparse(node.args)}){returns}:"


def file_pairs(source: str, path: str, min_words: int = 4, max_query_chars: int = 256
               ) -> list[Pair]:
  """Every documented function / method of one file, in source order; [] when it does not
  parse (a file written for another Python version)."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return []
  pairs = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    doc = ast.get_docstring(node, clean=False)
    if not doc:
      continue
    query = first_paragraph(doc, max_query_chars)
    if len(query.split()) >= min_words:
      pairs.append(Pair(query, def_line(node), path, node.lineno))
  return sorted(pairs, key=lambda p: p.lineno)


def dedupe(pairs: list[Pair]) -> list[Pair]:
  """The pairs whose query and document were not seen in an earlier pair."""
  queries, documents, kept = set(), set(), []
  for p in pairs:
    if p.query not in queries and p.document not in documents:
      kept.append(p)
    queries.add(p.query)
    documents.add(p.document)
  return kept


def stdlib_pairs(seed: int = 0, max_files: int | None = None, min_words: int = 4,
                 max_query_chars: int = 256) -> list[Pair]:
  """All deduplicated pairs of the standard library (of the first ``max_files`` files of the
  seeded order when it is set), by path then line."""
  root = text_lib.stdlib_root()
  paths = text_lib.seeded_order(text_lib.stdlib_files(root), seed, salt=0x5EA2)
  if max_files is not None:
    paths = paths[:max_files]
  pairs = []
  for rel in sorted(paths):
    data = text_lib.read_utf8(root / rel)
    if data is not None:
      pairs += file_pairs(data.decode("utf-8"), rel, min_words, max_query_chars)
  return dedupe(pairs)


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
  """Calibration and evaluation pairs from disjoint files; query i's document is document i."""

  calibration: list[Pair]
  evaluation: list[Pair]
  seed: int
  available: int  # deduplicated pairs the files held

  @staticmethod
  def queries(pairs: list[Pair]) -> list[str]:
    return [p.query for p in pairs]

  @staticmethod
  def documents(pairs: list[Pair]) -> list[str]:
    return [p.document for p in pairs]

  def record(self) -> dict:
    """What the job writes to JSON to pin the task."""
    files = lambda pairs: sorted({p.path for p in pairs})
    return {
        "source": "python-stdlib docstring -> def line",
        "python_version": platform.python_version(),
        "seed": self.seed,
        "available_pairs": self.available,
        "calibration": {"num_pairs": len(self.calibration),
                        "files": files(self.calibration)},
        "evaluation": {"num_pairs": len(self.evaluation), "files": files(self.evaluation)},
    }


def _sample(pairs: list[Pair], size: int, rng: np.random.Generator) -> list[Pair]:
  keep = np.sort(rng.choice(len(pairs), size, replace=False))
  return [pairs[i] for i in keep]


def code_search_task(seed: int = 0, calibration_size: int = 512, evaluation_size: int = 1000,
                     max_files: int | None = None, min_words: int = 4,
                     max_query_chars: int = 256) -> RetrievalTask:
  """Calibration and evaluation pairs from disjoint files (see the module docstring), the same
  for the same seed and Python; DataError (a ValueError) when there are not enough pairs."""
  if calibration_size < 0 or evaluation_size < 1:
    raise DataError(f"calibration_size={calibration_size} must be >= 0 and "
                    f"evaluation_size={evaluation_size} >= 1.")
  pairs = stdlib_pairs(seed, max_files, min_words, max_query_chars)
  by_file: dict[str, list[Pair]] = {}
  for p in pairs:
    by_file.setdefault(p.path, []).append(p)
  calibration, evaluation = [], []
  for path in text_lib.seeded_order(list(by_file), seed, salt=0xCA1B):
    pool = calibration if len(calibration) < calibration_size else evaluation
    pool += by_file[path]
  if len(calibration) < calibration_size or len(evaluation) < evaluation_size:
    raise DataError(
        f"the standard library gave {len(pairs)} retrieval pairs (max_files={max_files}): "
        f"{len(calibration)} for calibration, {len(evaluation)} for evaluation from other files, "
        f"fewer than the {calibration_size} + {evaluation_size} asked for; lower the sizes or "
        "raise max_files.")
  rng = np.random.default_rng([seed, 0x5EA2])
  return RetrievalTask(_sample(calibration, calibration_size, rng),
                       _sample(evaluation, evaluation_size, rng), seed, len(pairs))

