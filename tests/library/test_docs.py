"""The docs stay generated from the code and the committed results."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


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
