"""The compression report: per-layer table, totals, accuracy per stage, plots."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
import numpy as np

from gkq_jax import rules as rules_lib
from gkq_jax.quantize import clustered_leaves


def layer_rows(quantized: Any, file_sizes: dict) -> list[dict]:
  rows = []
  for path, leaf in clustered_leaves(quantized):
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


def fp32_bytes(variables: Any) -> int:
  return int(sum(4 * np.size(x) for x in jax.tree.leaves(variables)))


def write(workdir: pathlib.Path, results: dict, rows: list[dict]) -> str:
  """Writes report.json and report.md; returns the Markdown."""
  (workdir / "report.json").write_text(json.dumps({**results, "layers": rows}, indent=2))
  acc = results["accuracy"]
  lines = ["# gkq_jax compression report", "",
           f"- fp32 bytes (all model variables): {results['fp32_bytes']:,}",
           f"- compressed file: {results['compressed_bytes']:,} bytes "
           f"({results['compressed_file']})",
           f"- compression ratio: {results['compression_ratio']:.1f}x", "",
           "| stage | test accuracy |", "|---|---|"]
  lines += [f"| {stage} | {100 * a:.2f}% |" for stage, a in acc.items()]
  lines += ["", "| layer | shape | kept % | K | index bits | coded bits / weight | coding | bytes |",
            "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['kept_percent']:.1f} | "
                 f"{r['clusters']} | {r['index_bits']} | {r['coded_bits_per_weight']:.2f} | "
                 f"{r['coding']} | {r['bytes']:,} |")
  text = "\n".join(lines) + "\n"
  (workdir / "report.md").write_text(text)
  return text


def plot(workdir: pathlib.Path, params: Any, quantized: Any, results: dict) -> list[str]:
  """weights.png: the largest clustered layer's weights and its centroids;
  stages.png: accuracy and size per stage."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  leaves = clustered_leaves(quantized)
  if leaves:
    path, leaf = max(leaves, key=lambda pl: int(np.prod(pl[1].shape)))
    flat = dict((rules_lib.path_string(p), np.asarray(w)) for p, w in
                jax.tree_util.tree_flatten_with_path(params)[0])
    original = flat.get(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    if original is not None:
      values = original.reshape(-1)
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
    written.append("weights.png")

  fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
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
  fig.tight_layout()
  fig.savefig(workdir / "stages.png", dpi=120)
  plt.close(fig)
  written.append("stages.png")
  return written

