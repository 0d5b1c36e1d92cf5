"""Every file the job writes: reports (md, json), tables (csv, md) and plots (png).

Only process 0 writes: under ``jax.distributed`` every host runs the same code.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
from typing import Any

import jax
import numpy as np
from absl import logging

import gkq_jax as gkq


def _is_writer() -> bool:
  return jax.process_index() == 0


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def fp32_bytes(variables: Any) -> int:
  return int(sum(4 * np.size(x) for x in jax.tree.leaves(variables)))


class MetricWriter:
  """absl logging plus one JSON object per line in ``workdir/metrics.jsonl``."""

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / "metrics.jsonl"

  def write(self, **record):
    record = {k: (float(v) if isinstance(v, (np.floating, jax.Array)) else v)
              for k, v in record.items()}
    logging.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in record.items()))
    if _is_writer():
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def write_results(workdir: pathlib.Path, results: dict) -> None:
  if _is_writer():
    (workdir / "results.json").write_text(json.dumps(results, indent=2))


def _git_commit() -> str | None:
  """The checkout's commit (with ``+dirty`` when it has uncommitted changes), if any."""
  root = pathlib.Path(__file__).resolve().parents[2]
  git = lambda *args: subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                     text=True, timeout=10, check=True).stdout.strip()
  try:
    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return None
  return head + ("+dirty" if dirty else "")


def _machine() -> str:
  device = jax.devices()[0]
  kind = device.device_kind if device.platform != "cpu" else f"{os.cpu_count()}-core CPU"
  return f"{kind} ({platform.machine()}, jax {jax.__version__})"


def _stage_table(results: dict) -> dict:
  """The default table of a run: test (and validation) accuracy per stage."""
  stages = results.get("accuracy", {})
  validation = results.get("validation_accuracy", {})
  columns = ["stage", "test accuracy"] + (["validation accuracy"] if validation else [])
  rows = [[stage, acc] + ([validation.get(stage)] if validation else [])
          for stage, acc in stages.items()]
  return {"columns": columns, "rows": rows,
          "formats": {"test accuracy": ".2%", "validation accuracy": ".2%"}}


SUMMARY_FIGURES = ("accuracy", "validation_accuracy", "compression_ratio", "compressed_bytes",
                   "fp32_bytes", "parameters")


def write_summary(workdir: pathlib.Path, config, results: dict, command: str) -> dict:
  """``summary.json``: what a docs table is rendered from (``tools/render_results.py``):
  the command, the commit, the date, the machine, the config, the headline
  figures and the run's table (``results["table"]`` when the mode made one,
  else accuracy per stage)."""
  summary = {
      "command": command, "commit": _git_commit(),
      "date": datetime.date.today().isoformat(), "machine": _machine(),
      "source": "job summary", "config": json.loads(config.to_json_best_effort()),
      "figures": {k: results[k] for k in SUMMARY_FIGURES if k in results},
      **results.get("table", _stage_table(results)),
  }
  if _is_writer():
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
  return summary


# -------------------------------------------------------------- compression


def layer_rows(quantized: Any, file_sizes: dict) -> list[dict]:
  rows = []
  for path, leaf in gkq.clustered_leaves(quantized):
    idx = np.asarray(leaf.indices)
    dense = np.asarray(leaf.dequantize())
    n = dense.size
    k = leaf.num_clusters
    entry = file_sizes.get(path, {"bytes": 0, "coding": "?"})
    book_bytes = int(np.asarray(leaf.codebook).nbytes)
    rows.append({
        "layer": path, "shape": list(leaf.shape), "weights": int(n),
        "kept_percent": 100.0 * float(np.count_nonzero(dense)) / n,
        "clusters": int(k), "index_bits": max(1, math.ceil(math.log2(max(k, 2)))),
        "coded_bits_per_weight": 8.0 * (entry["bytes"] - book_bytes) / n,
        "coding": entry["coding"], "bytes": int(entry["bytes"]),
        "distinct_values": int(len(np.unique(dense))) if idx.size else 0,
    })
  return rows


def _accuracy_table(results: dict) -> list[str]:
  """Stage | test accuracy [| validation accuracy] rows."""
  val = results.get("validation_accuracy")
  if not val:
    return ["| stage | test accuracy |", "|---|---|"] + [
        f"| {stage} | {100 * a:.2f}% |" for stage, a in results["accuracy"].items()]
  return ["| stage | validation accuracy | test accuracy |", "|---|---|---|"] + [
      f"| {stage} | {100 * val[stage]:.2f}% | {100 * a:.2f}% |"
      for stage, a in results["accuracy"].items()]


def _energy_line(results: dict) -> list[str]:
  """One line: estimated energy per example of each stage (gkq_jax/energy.py's model)."""
  stages = results.get("energy", {}).get("stages")
  if not stages:
    return []
  parts = ", ".join(f"{name} {e['total_uj']:.3g} uJ" for name, e in stages.items())
  first, last = stages[next(iter(stages))], stages[list(stages)[-1]]
  return [f"- energy per example (estimate, 45 nm): {parts} "
          f"({first['total_uj'] / last['total_uj']:.1f}x less)"]


def _deep_kmeans_line(results: dict) -> list[str]:
  """Deep k-Means' own ratio (conv kernels shared as vectors), when there are any."""
  if "deep_kmeans_ratio" not in results:
    return []
  return [f"- Deep k-Means accounting (conv layers only, K x d x 32 + N x H bits): "
          f"{results['deep_kmeans_ratio']:.1f}x"]


def _compression_markdown(results: dict, rows: list[dict]) -> str:
  lines = ["# gkq_jax compression report", "",
           f"- fp32 bytes (all model variables): {results['fp32_bytes']:,}",
           f"- compressed file: {results['compressed_bytes']:,} bytes "
           f"({results['compressed_file']})",
           f"- compression ratio: {results['compression_ratio']:.1f}x",
           *_energy_line(results), *_deep_kmeans_line(results), "",
           *_accuracy_table(results)]
  lines += ["",
            "| layer | shape | kept % | K | index bits | coded bits / weight | coding | bytes |",
            "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['kept_percent']:.1f} | "
                 f"{r['clusters']} | {r['index_bits']} | {r['coded_bits_per_weight']:.2f} | "
                 f"{r['coding']} | {r['bytes']:,} |")
  return "\n".join(lines) + "\n"


def write_compression(workdir: pathlib.Path, results: dict, params: Any, quantized: Any,
                      file_sizes: dict) -> tuple[str, list[str]]:
  """report.json, report.md, weights.png and stages.png; returns (Markdown, plots)."""
  rows = layer_rows(quantized, file_sizes)
  text = _compression_markdown(results, rows)
  if not _is_writer():
    return text, []
  (workdir / "report.json").write_text(json.dumps({**results, "layers": rows}, indent=2))
  (workdir / "report.md").write_text(text)
  return text, _plot_weights(workdir, params, quantized) + _plot_stages(workdir, results)


def _plot_weights(workdir, params, quantized) -> list[str]:
  """weights.png: the largest clustered layer's weights and its centroids."""
  leaves = gkq.clustered_leaves(quantized)
  if not leaves:
    return []
  plt = _pyplot()
  path, leaf = max(leaves, key=lambda pl: int(np.prod(pl[1].shape)))
  original = dict(gkq.named_leaves(params)).get(path)
  fig, ax = plt.subplots(figsize=(7, 4))
  if original is not None:
    values = np.asarray(original).reshape(-1)
    values = values[values != 0] if leaf.pinned_zero else values
    ax.hist(values, bins=200, color="tab:blue", alpha=0.7, label="weights before clustering")
  for c in np.unique(np.asarray(leaf.codebook)):
    ax.axvline(c, color="tab:red", lw=0.8)
  ax.plot([], [], color="tab:red", label="shared values (centroids)")
  ax.set(title=f"{path}: {leaf.num_clusters} clusters", xlabel="weight", ylabel="count")
  ax.legend()
  fig.tight_layout()
  fig.savefig(workdir / "weights.png", dpi=120)
  plt.close(fig)
  return ["weights.png"]


def _plot_stages(workdir, results) -> list[str]:
  """stages.png: accuracy and size per stage (and estimated energy, when known)."""
  plt = _pyplot()
  energy = results.get("energy", {}).get("stages")
  fig, axes = plt.subplots(1, 3 if energy else 2, figsize=(13.5 if energy else 9, 3.6))
  a1, a2 = axes[:2]
  stages = list(results["accuracy"])
  values = [100 * results["accuracy"][s] for s in stages]
  bars = a1.bar(stages, values, color="tab:green")
  a1.bar_label(bars, fmt="%.2f", fontsize=8)
  # Zoomed: the differences between stages are what the plot is for.
  a1.set_ylim(max(0.0, min(values) - 2.0), min(100.0, max(values) + 1.0))
  a1.set(ylabel="test accuracy (%)", title="accuracy per stage")
  a1.tick_params(axis="x", rotation=30)
  sizes = {"fp32": results["fp32_bytes"], "compressed file": results["compressed_bytes"]}
  size_bars = a2.bar(list(sizes), [v / 1024 for v in sizes.values()], color="tab:purple")
  a2.bar_label(size_bars, fmt="%.1f", fontsize=8)
  a2.set(ylabel="KiB", title=f"size ({results['compression_ratio']:.1f}x smaller)")
  if energy:
    energy_bars = axes[2].bar(list(energy), [e["total_uj"] for e in energy.values()],
                              color="tab:orange")
    axes[2].bar_label(energy_bars, fmt="%.3g", fontsize=8)
    axes[2].set(ylabel="uJ per example", title="energy (estimate, 45 nm)")
  fig.tight_layout()
  fig.savefig(workdir / "stages.png", dpi=120)
  plt.close(fig)
  return ["stages.png"]


# ------------------------------------------------------------------ studies


def write_sensitivity(workdir: pathlib.Path, rows: list[dict], baseline: float) -> None:
  """sensitivity.csv and sensitivity.png."""
  if not _is_writer():
    return
  with (workdir / "sensitivity.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 4))
  for path in dict.fromkeys(r["layer"] for r in rows):
    mine = [r for r in rows if r["layer"] == path]
    ax.plot([r["bits"] for r in mine], [100 * r["test_accuracy"] for r in mine], marker="o",
            label=path)
  ax.axhline(100 * baseline, color="k", ls="--", lw=0.8, label="fp32")
  ax.set(xlabel="bits (2^bits shared values) for this layer only", ylabel="test accuracy (%)",
         title="layer sensitivity")
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(workdir / "sensitivity.png", dpi=120)
  plt.close(fig)


def write_compare(workdir: pathlib.Path, rows: list[dict], baseline: float) -> str:
  """compare.md; returns its text."""
  if "validation_after_finetune" in rows[0]:
    lines = ["| method | bits | validation before fine-tuning | after | test before "
             "fine-tuning | after |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['bits']} | {100 * r['validation_before_finetune']:.2f}% | "
              f"{100 * r['validation_after_finetune']:.2f}% | "
              f"{100 * r['before_finetune']:.2f}% | {100 * r['after_finetune']:.2f}% |"
              for r in rows]
  else:
    lines = ["| method | bits | accuracy before fine-tuning | after |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['bits']} | {100 * r['before_finetune']:.2f}% | "
              f"{100 * r['after_finetune']:.2f}% |" for r in rows]
  text = f"baseline fp32: {100 * baseline:.2f}%\n\n" + "\n".join(lines) + "\n"
  if _is_writer():
    (workdir / "compare.md").write_text(text)
  return text


# ------------------------------------------------------------------- survey


def write_survey_row(path: pathlib.Path, row: dict) -> None:
  """A finished survey method's row, written atomically: its presence means done."""
  if _is_writer():
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(row, indent=2))
    partial.replace(path)


def _survey_markdown(rows: list[dict], latency_key: str) -> str:
  batches = list(rows[0]["latency_ms"])
  has_val = any(r["validation_accuracy"] is not None for r in rows)
  head = (["method"] + (["validation acc."] if has_val else []) +
          ["test acc.", "params", "fp32 bytes", "file bytes", "x smaller", "MACs"] +
          [f"latency b={b} (ms)" for b in batches] + ["energy (uJ)", "Pareto front"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    energy = r.get("energy")
    front = [name for name, key in (("bytes", "pareto_bytes"),
                                    (f"latency b={latency_key}", "pareto_latency")) if r[key]]
    cells = ([r["method"]] +
             ([f"{100 * r['validation_accuracy']:.2f}%"
               if r["validation_accuracy"] is not None else "-"] if has_val else []) +
             [f"{100 * r['test_accuracy']:.2f}%", f"{r['parameters']:,}",
              f"{r['fp32_bytes']:,}", f"{r['file_bytes']:,}", f"{r['compression']:.1f}",
              f"{r['macs']:,}"] +
             [f"{r['latency_ms'][b]:.3f}" for b in batches] +
             [f"{energy['total_uj']:.3g}" if energy else "-", ", ".join(front)])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_survey(workdir: pathlib.Path, rows: list[dict],
                 latency_key: str) -> tuple[str, list[str]]:
  """survey.md, survey.json and the accuracy-vs-bytes / -vs-latency plots with
  the Pareto front marked; returns (Markdown, plot file names)."""
  text = ("# Compression survey\n\nAll methods from one baseline; test accuracy from each "
          "method's file; latency: median of the jitted forward, all methods timed in turn; "
          "Pareto front: no other method is at least as accurate and at most as costly.\n\n"
          + _survey_markdown(rows, latency_key))
  if not _is_writer():
    return text, []
  (workdir / "survey.md").write_text(text)
  (workdir / "survey.json").write_text(json.dumps(
      {"latency_batch_for_pareto": int(latency_key), "rows": rows}, indent=2))
  plots = [_plot_survey(workdir, rows, lambda r: r["file_bytes"] / 1024,
                        "file bytes on disk (KiB, log scale)", "pareto_bytes",
                        "survey_bytes.png"),
           _plot_survey(workdir, rows, lambda r: r["latency_ms"][latency_key],
                        f"latency of the jitted forward, batch {latency_key} (ms, log scale)",
                        "pareto_latency", "survey_latency.png")]
  return text, plots


def _plot_survey(workdir, rows, cost, xlabel, flag, filename) -> str:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 5))
  xs = [cost(r) for r in rows]
  ys = [100 * r["test_accuracy"] for r in rows]
  ax.scatter(xs, ys, color="tab:gray", zorder=2, label="method")
  front = sorted((x, y) for x, y, r in zip(xs, ys, rows) if r[flag])
  ax.step([x for x, _ in front], [y for _, y in front], where="post", color="tab:red",
          lw=1.2, zorder=1)
  ax.scatter([x for x, _ in front], [y for _, y in front], color="tab:red", zorder=3,
             label="Pareto front")
  for x, y, r in zip(xs, ys, rows):
    ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7,
                color="tab:red" if r[flag] else "black")
  ax.set_xscale("log")
  ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title="accuracy vs " + xlabel.split(" (")[0])
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(workdir / filename, dpi=120)
  plt.close(fig)
  return filename


# -------------------------------------------------------------- equal bytes


def write_equal_bytes(workdir: pathlib.Path, rows: list[dict], results: dict) -> str:
  """equal_bytes.md (and .json); returns the markdown."""
  validation = "validation_after_finetune" in rows[0]
  head = "| method | bits | budget bytes | bytes | g^2-weighted distortion |"
  head += (" validation before | after |" if validation else "") + " test before | after |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    line = (f"| {r['method']} | {r['bits']} | {r['budget_bytes']:,} | {r['bytes']:,} | "
            f"{r['distortion']:.4g} |")
    if validation:
      line += (f" {100 * r['validation_before_finetune']:.2f}% |"
               f" {100 * r['validation_after_finetune']:.2f}% |")
    lines.append(line + f" {100 * r['before_finetune']:.2f}% | {100 * r['after_finetune']:.2f}% |")
  base = results["accuracy"]["baseline"]
  text = f"baseline fp32: test {100 * base:.2f}%"
  if "validation_accuracy" in results:
    text += f", validation {100 * results['validation_accuracy']['baseline']:.2f}%"
  text += "\n\n" + "\n".join(lines) + "\n"
  if _is_writer():
    (workdir / "equal_bytes.md").write_text(text)
    (workdir / "equal_bytes.json").write_text(json.dumps(rows, indent=2))
  return text
