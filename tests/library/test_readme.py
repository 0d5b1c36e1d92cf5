"""Every ```python block of the README runs as written and prints what it says."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
  assert len(BLOCKS) >= 3


def _near_optimal(line):  # hist's weighted error over the exact optimum's
  return 1 - 1e-5 <= float(line) <= 1.01


# What a snippet prints, line by line (a regex to fullmatch, or a check), found
# by a line of code that only that snippet holds.
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
}


def test_every_checked_output_has_its_snippet():
  for marker in PRINTED:
    assert sum(marker in block for block in BLOCKS) == 1, marker


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, capsys):
  exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})
  lines = capsys.readouterr().out.splitlines()
  for marker, expected in PRINTED.items():
    if marker in BLOCKS[index]:
      assert len(lines) == len(expected), lines
      for line, check in zip(lines, expected):
        assert check(line) if callable(check) else re.fullmatch(check, line), line
