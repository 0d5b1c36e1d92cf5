"""Per-channel clustering at Llama-2-7B shapes: gkq_jax.stream_per_channel vs flash1dkmeans.

    python benchmarks/cluster_llm.py [--layers 2] [--k 16] [--channels 0]

SqueezeLLM's setting: every output channel of every matrix of a decoder layer
(q, k, v, o: 4096 x 4096; gate, up: 4096 x 11008; down: 11008 x 4096, stored
(inputs, outputs) as Flax kernels) gets its own codebook of K values, fitted by
Fisher-weighted k-means. Weights are Student-t distributed (5 degrees of
freedom, as trained LLM weights are heavy-tailed), importance is g^2 with g
standard normal (a random positive Fisher diagonal). Layers are made one at a
time, as a checkpoint streamed from disk would be.

Methods, on the same channels:
  * gkq: ``stream_per_channel`` (chunks of whole channels through
    ``grouped_kmeans_1d``, default options), all cores via XLA;
  * flash1dkmeans per channel, the way SqueezeLLM calls its k-means
    (one call per output row, max_iter=50, random_state=0), one process.

Times are wall seconds for the first ``--layers`` decoder layers, extrapolated
to 32 by the number of layers. gkq's first layer includes compilation; "warm"
is the mean over the later layers. Weighted SSE (float64) is summed over the
same channels for both. Memory: peak resident set size sampled every 5 ms
while gkq clusters a layer, above the process's size before that layer was
made, against the layer's float32 weight bytes. ``--channels N`` clusters only
the first N channels of each matrix (a quick check; the table is for 0 = all).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import threading
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import gkq_jax as gkq  # noqa: E402

HIDDEN, INTERMEDIATE, LLAMA_LAYERS = 4096, 11008, 32
MATRICES = (("q", HIDDEN, HIDDEN), ("k", HIDDEN, HIDDEN), ("v", HIDDEN, HIDDEN),
            ("o", HIDDEN, HIDDEN), ("gate", HIDDEN, INTERMEDIATE), ("up", HIDDEN, INTERMEDIATE),
            ("down", INTERMEDIATE, HIDDEN))


def make_layer(index: int, channels: int):
  """The decoder layer's (name, weight, importance) triples, float32, (inputs, outputs)."""
  rng = np.random.default_rng(index)
  out = []
  for name, rows, cols in MATRICES:
    cols = min(cols, channels) if channels else cols
    w = np.empty((rows, cols), np.float32)
    h = np.empty((rows, cols), np.float32)
    for start in range(0, rows, 1024):  # float64 draws a block at a time
      stop = min(start + 1024, rows)
      w[start:stop] = rng.standard_t(5, (stop - start, cols)) * 0.02
      h[start:stop] = rng.standard_normal((stop - start, cols)) ** 2
    out.append((f"layers/{index}/{name}", w, h))
  return out


def weighted_sse(w, h, codebook, indices):
  """sum over channels of sum h (w - codebook[channel][index])^2, in float64."""
  dense = np.take_along_axis(np.asarray(codebook, np.float64).T, indices.astype(np.int64), 0)
  return float((h.astype(np.float64) * (w - dense) ** 2).sum())


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
  """Samples the resident set size every 5 ms while active."""

  def __enter__(self):
    self.peak, self._stop = rss_bytes(), threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self):
    while not self._stop.wait(0.005):
      self.peak = max(self.peak, rss_bytes())

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes())


def run_gkq(layer, k, chunk_values):
  with PeakRss() as peak:
    start = time.perf_counter()
    results = dict(gkq.stream_per_channel(iter(layer), k, chunk_values=chunk_values))
    seconds = time.perf_counter() - start
  sse = sum(weighted_sse(w, h, np.asarray(results[name].codebook),
                         np.asarray(results[name].indices)) for name, w, h in layer)
  return seconds, sse, peak.peak


def _flash_rows(args):
  import flash1dkmeans

  rows, imps, k = args
  out = [flash1dkmeans.kmeans_1d(r, k, sample_weights=i, max_iter=50, random_state=0)
         for r, i in zip(rows, imps)]
  return np.stack([c for c, _ in out]), np.stack([a for _, a in out])


def run_flash(layer, k, processes):
  """flash1dkmeans on every output channel (one call per row, as SqueezeLLM), in 1 process or
  split over a pool; returns seconds (SSE bookkeeping excluded) and the weighted SSE."""
  _flash_rows((np.zeros((1, 64), np.float32), np.ones((1, 64), np.float32), k))  # numba compile
  pool = multiprocessing.get_context("fork").Pool(processes) if processes > 1 else None
  if pool:
    pool.map(_flash_rows, [(np.zeros((1, 64), np.float32), np.ones((1, 64), np.float32), k)]
             * processes)
  seconds, sse = 0.0, 0.0
  for _, w, h in layer:
    wt, ht = np.ascontiguousarray(w.T), np.ascontiguousarray(h.T)
    start = time.perf_counter()
    if pool:
      chunks = zip(np.array_split(wt, 8 * processes), np.array_split(ht, 8 * processes))
      parts = pool.map(_flash_rows, [(a, b, k) for a, b in chunks])
      books, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    else:
      books, labels = _flash_rows((wt, ht, k))
    seconds += time.perf_counter() - start
    sse += weighted_sse(w, h, books, labels.T)
  if pool:
    pool.close()
  return seconds, sse


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--k", type=int, default=16)
  parser.add_argument("--channels", type=int, default=0,
                      help="only the first N output channels of each matrix (0: all)")
  parser.add_argument("--chunk-values", type=int, default=gkq.DEFAULT_CHUNK_VALUES)
  parser.add_argument("--flash-processes", type=int, default=1,
                      help="flash1dkmeans in this many processes (channels split between them)")
  parser.add_argument("--skip-flash", action="store_true")
  parser.add_argument("--json", help="write a results summary here")
  args = parser.parse_args()

  print(f"Llama-2-7B shapes, first {args.layers} decoder layers, K = {args.k}, per output "
        f"channel; {jax.devices()[0].platform}, {os.cpu_count()} CPUs\n")
  rows = []
  for index in range(args.layers):
    base = rss_bytes()
    layer = make_layer(index, args.channels)
    layer_bytes = sum(w.nbytes for _, w, _ in layer)
    channels = sum(w.shape[1] for _, w, _ in layer)
    g_time, g_sse, g_peak = run_gkq(layer, args.k, args.chunk_values)
    f_time, f_sse = ((float("nan"), float("nan")) if args.skip_flash
                     else run_flash(layer, args.k, args.flash_processes))
    rows.append((index, channels, layer_bytes, g_time, f_time, g_sse, f_sse, g_peak - base))
    print(f"layer {index}: {channels} channels, gkq {g_time:.1f} s, flash1dkmeans {f_time:.1f} s, "
          f"SSE ratio {g_sse / f_sse:.4f}, peak {(g_peak - base) / layer_bytes:.2f}x the layer",
          flush=True)
    del layer

  g_total, f_total = sum(r[3] for r in rows), sum(r[4] for r in rows)
  warm = rows[1:] or rows
  g_warm = float(np.mean([r[3] for r in warm]))
  # 32 layers: the first (compiling) as measured, every later one as the later ones measured.
  g_32 = rows[0][3] + (LLAMA_LAYERS - 1) * g_warm
  f_32 = f_total * LLAMA_LAYERS / args.layers
  g_sse, f_sse = sum(r[5] for r in rows), sum(r[6] for r in rows)
  peak = max(r[7] / r[2] for r in warm)
  flash = f"flash1dkmeans per channel, {args.flash_processes} process(es)"
  print("\n| method | s, these layers | s, 32 layers (extrapolated) | weighted SSE | SSE / flash "
        "| x faster than flash (32 layers) | peak memory / layer bytes |")
  print("|---|---|---|---|---|---|---|")
  print(f"| gkq stream_per_channel | {g_total:.1f} (first layer {rows[0][3]:.1f}, then "
        f"{g_warm:.1f} / layer) | {g_32:.0f} | {g_sse:.6g} | {g_sse / f_sse:.4f} | "
        f"{f_32 / g_32:.2f} | {peak:.2f} |")
  print(f"| {flash} | {f_total:.1f} | {f_32:.0f} | {f_sse:.6g} | 1.0000 | 1.00 | - |")
  if args.json:
    import _summary
    _summary.write(args.json, [
        "method", "s, these layers", "s, 32 layers (extrapolated)", "weighted SSE",
        "SSE / flash", "x faster than flash (32 layers)", "peak memory / layer bytes"], [
        ["gkq stream_per_channel", f"{g_total:.1f} (first layer {rows[0][3]:.1f}, then "
         f"{g_warm:.1f} / layer)", f"{g_32:.0f}", f"{g_sse:.6g}", f"{g_sse / f_sse:.4f}",
         f"{f_32 / g_32:.2f}", f"{peak:.2f}"],
        [flash, f"{f_total:.1f}", f"{f_32:.0f}", f"{f_sse:.6g}", "1.0000", "1.00", "-"]])
  print(f"\nlayer = {rows[0][2] / 2 ** 20:.0f} MiB of float32 weights; peak = resident set while "
        "gkq clusters a layer, above the process before the layer was made (weights + importance "
        "+ clustering)" + (", over the layers after the first (the first also compiles)"
                           if len(rows) > 1 else "") + ".")


if __name__ == "__main__":
  main()
