"""The docs stay generated from the code and the committed results, and every
```python block of the docs (and of the README) runs as written and prints what
it says."""

import importlib.util
import json
import pathlib
import re
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts) + [ROOT / "README.md"]
FENCE = re.compile(r"^( *)```python\n(.*?)^\1```", re.M | re.S)


def _python_blocks():
  """{code: [where]}: every ```python block of the pages, once per distinct code
  (the README repeats some of the docs' examples; each runs once)."""
  blocks: dict[str, list[str]] = {}
  for page in PAGES:
    for index, match in enumerate(FENCE.finditer(page.read_text())):
      code = textwrap.dedent(match.group(2))
      blocks.setdefault(code, []).append(f"{page.relative_to(ROOT)}[python block {index}]")
  return blocks


BLOCKS = _python_blocks()
CODES = list(BLOCKS)


def _near_optimal(line):  # hist's weighted error over the exact optimum's
  return 1 - 1e-5 <= float(line) <= 1.01


def _file_and_fp32_bytes(line):  # "<size> bytes in the file, fp32: <bytes>"
  size, fp32 = re.fullmatch(r"(\d+) bytes in the file, fp32: (\d+)", line).groups()
  return int(size) < int(fp32) / 2


# What a block prints, line by line (a regex to fullmatch, or a check), found by
# a line of code that only that block holds (on whichever page holds it).
PRINTED = {
    "out = gkq.kmeans_1d(w, h, num_clusters=16)": [
        r"\(16,\) int32", _near_optimal, r"\(2, 8\)", r"\(8, 9\)"],
    'gkq.bits_rule(r"Conv_\\d+/kernel$", 3)': [
        r"params/Conv_0/kernel \(1, 8\) uint8", r"params/Dense_0/kernel \(1, 16\) uint8"],
    "self.hidden = nnx.Linear(784, 300, rngs=rngs)": [r"\(2, 10\)"],
    # 2,048 4-bit weights and 32 biases: under a quarter of the 8,320 fp32 bytes.
    'size, per_leaf = gkq.save("/tmp/model.gkq", q)': [
        lambda line: int(line.split()[0]) < 8320 / 4
        and line.split()[1] in ("fixed", "huffman", "sparse")],
    # Training through the codebooks lowers the loss; 3-bit kernel + raw bias < fp32.
    "q = gkq.reassign(params, q, imp)": [
        lambda line: line.split()[0] == "True" and int(line.split()[1]) < 8320 / 4],
    # Getting started (linen): the 4-bit file is under half the fp32 bytes.
    'gkq.save("/tmp/linen_model.gkq", q)': [_file_and_fp32_bytes],
}


def _renderer():
  spec = importlib.util.spec_from_file_location("render_results",
                                                ROOT / "tools" / "render_results.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_results_tables_in_the_docs_are_rendered_from_the_committed_summaries():
  stale = [str(page.relative_to(ROOT)) for page, (old, new)
           in _renderer().rendered_pages().items() if old != new]
  assert not stale, f"run python tools/render_results.py: stale tables in {stale}"


def test_every_committed_summary_has_its_table_in_the_docs():
  render = _renderer()
  shown = {match.group(2) for page in render.rendered_pages()
           for match in render.BLOCK.finditer(page.read_text())}
  orphans = sorted(set(render.load_summaries()) - shown)
  assert not orphans, f"results/{{name}}.json with no <!-- results:name --> page: {orphans}"


def test_a_changed_summary_makes_its_table_stale(tmp_path, monkeypatch):
  render = _renderer()
  (tmp_path / "results").mkdir()
  (tmp_path / "docs").mkdir()
  summary = {"command": "python main.py --config=configs/mlp.py", "date": "2026-12-05",
             "machine": "2-core CPU", "columns": ["stage", "test accuracy"],
             "rows": [["baseline", 0.98612]], "formats": {"test accuracy": ".2%"}}
  (tmp_path / "results" / "demo.json").write_text(json.dumps(summary))
  page = tmp_path / "docs" / "page.md"
  page.write_text("# Results\n\n<!-- results:demo -->\n<!-- /results:demo -->\n")
  monkeypatch.setattr(render, "RESULTS", tmp_path / "results")
  monkeypatch.setattr(render, "DOCS", tmp_path / "docs")
  monkeypatch.setattr(render, "ROOT", tmp_path)
  assert render.main(["--check"]) == 1  # never rendered
  assert render.main([]) == 0
  assert "| baseline | 98.61% |" in page.read_text()
  assert render.main(["--check"]) == 0
  summary["rows"][0][1] = 0.97
  (tmp_path / "results" / "demo.json").write_text(json.dumps(summary))
  assert render.main(["--check"]) == 1  # the figure moved, the page did not
  summary["rows"][0].append("extra")
  (tmp_path / "results" / "demo.json").write_text(json.dumps(summary))
  with pytest.raises(ValueError, match="a row of 3 cells for 2 columns"):
    render.main([])


def test_docs_have_python_blocks():
  in_docs = [code for code, where in BLOCKS.items()
             if any(w.startswith("docs") for w in where)]
  assert len(in_docs) >= 14, len(in_docs)


def test_python_is_only_fenced_as_python():
  # A block fenced ```py or {code-block} python would be shown but never run.
  other = re.compile(r"^ *(```|:::)\s*(py|python3|ipython|pycon|\{code-block\}\s+python|"
                     r"\{code\}\s+python)\s*$", re.M)
  for page in PAGES:
    found = other.findall(page.read_text())
    assert not found, f"{page.relative_to(ROOT)}: fence it ```python (or ```text): {found}"


def test_every_checked_output_has_its_block():
  for marker in PRINTED:
    holders = [BLOCKS[code] for code in CODES if marker in code]
    assert any(w.startswith("docs") for where in holders for w in where), (
        f"no docs page holds {marker!r}")
    for page in PAGES:  # within a page the marker names one block
      name = str(page.relative_to(ROOT))
      assert sum(w.startswith(name + "[") for where in holders for w in where) <= 1, (
          marker, name)


@pytest.mark.parametrize("index", range(len(CODES)),
                         ids=[BLOCKS[code][0].replace(" ", "_") for code in CODES])
def test_python_block_runs(index, capsys):
  code = CODES[index]
  exec(compile(code, " = ".join(BLOCKS[code]), "exec"), {})
  lines = capsys.readouterr().out.splitlines()
  for marker, expected in PRINTED.items():
    if marker in code:
      assert len(lines) == len(expected), lines
      for line, check in zip(lines, expected):
        assert check(line) if callable(check) else re.fullmatch(check, line), line
