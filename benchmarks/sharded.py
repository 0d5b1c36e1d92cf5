"""Compression where sharded weights lie: a Llama-2-7B-shaped layer on 1..8 devices.

    python benchmarks/sharded.py [--scale 1.0] [--devices 1,2,4,8] [--dtype bfloat16]
                                 [--granularity channel|layer] [--json results/sharded_scale.json]
    python benchmarks/sharded.py --scale 1.0 --memory-only   # compiled programs' memory only

One decoder layer of Llama-2-7B's shapes (q, k, v, o: 4096 x 4096; gate, up:
4096 x 11008; down: 11008 x 4096, stored (inputs, outputs) as Flax kernels;
``--scale`` multiplies every dimension, rounded to a multiple of 8 so that the
channels split evenly over 8 devices), Student-t weights (5 degrees of freedom)
in ``--dtype``, importance g^2 (g standard normal) in float32. Every weight and
its importance are sharded ``NamedSharding(mesh, P(None, "model"))``: each
device holds a contiguous block of output channels. ``gkq.quantize(params,
importance, [gkq.bits_rule(".", 4)], granularity="channel")`` gives every
output channel its own codebook of K = 16 values, each device clustering the
channels it holds (:mod:`gkq_jax.sharding`); ``--granularity layer`` one
codebook per matrix, from histograms and sums added over the devices (equal to
one device's up to the order of those float32 sums).

The device count must be fixed before JAX starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``), so the script runs
itself once per count in a fresh process (``--child N``) and compares.
Figures per device count:

* quantize s: wall time of one ``gkq.quantize`` call on the layer, the first
  in the process, so compilation is included (a later call on the same
  shapes reuses the compiled shard-local programs). With one device the mesh
  is a single device, so quantize takes its unsharded path (all seven
  matrices in one compiled call); with more, one shard_map program per matrix
  shape.
* run s: the shard-local programs alone, compiled beforehand, over the seven
  matrices (what a warm call would cost without compiling).
* memory: quantize's own shard-local program of each matrix shape (the
  compiled ``jit(shard_map(...))`` it runs; on one device the same program on
  a one-device mesh, where quantize itself takes its unsharded path), its
  ``memory_analysis()`` per device: argument + output + temp bytes, for the
  largest matrix, and that over the device's shard of the matrix's weight +
  importance (argument bytes). Per channel, a device clusters its channels a
  block at a time (``gkq_jax.quantize.channel_blocks``), so the temp is one
  block's. "layer peak" adds, as quantize runs the matrices one after another,
  the whole layer's shard of weights and importance, every matrix's codebooks
  and indices, and the largest temp, over the layer's shard.
* equal to 1 device: the codebooks and indices of all seven matrices, byte for
  byte (sha-256 of ``np.asarray``), against the one-device run; the programs
  lowered here give the same arrays as quantize (checked too). Below
  ``--scale 0.125`` (fan-in under 512) the one-device run differs: it clusters
  all seven matrices in one grouped call, and the "dp" start's resolution
  follows the largest histogram in the call, while each device clusters one
  matrix at a time.
* the output shardings (indices' and codebooks' PartitionSpec).

On a CPU the simulated devices are threads sharing the host's cores, so wall
time does not fall as devices are added; the figures that carry over to real
devices are the memory per device and the equality.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time

HIDDEN, INTERMEDIATE = 4096, 11008
BITS = 4


def matrices(scale: float) -> list[tuple[str, int, int]]:
  """(name, inputs, outputs) of one decoder layer, every dimension times ``scale``."""
  def dim(n):
    return max(8, int(round(n * scale / 8)) * 8)
  h, i = dim(HIDDEN), dim(INTERMEDIATE)
  return [("q", h, h), ("k", h, h), ("v", h, h), ("o", h, h), ("gate", h, i), ("up", h, i),
          ("down", i, h)]


def make_layer(scale: float, dtype):
  """{name: weight}, {name: importance} as host arrays (the same for every device count)."""
  import numpy as np

  weights, importance = {}, {}
  for n, (name, rows, cols) in enumerate(matrices(scale)):
    rng = np.random.default_rng(n)
    w = np.empty((rows, cols), dtype)
    h = np.empty((rows, cols), np.float32)
    for start in range(0, rows, 1024):  # float64 draws a block at a time
      stop = min(start + 1024, rows)
      w[start:stop] = (rng.standard_t(5, (stop - start, cols)) * 0.02).astype(dtype)
      h[start:stop] = rng.standard_normal((stop - start, cols)) ** 2
    weights[name], importance[name] = w, h
  return weights, importance


def child(args) -> dict:
  """One device count (XLA_FLAGS already set by the parent): the figures as a dict."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  import gkq_jax as gkq

  devices = jax.devices()
  assert len(devices) == args.child, (len(devices), args.child)
  mesh = Mesh(np.array(devices), ("model",))
  spec = P(None, "model")
  sharding = NamedSharding(mesh, spec)
  rules = [gkq.bits_rule(".", BITS)]
  dtype = jnp.dtype(args.dtype)
  if args.memory_only:  # the compiled programs only, from shapes: no arrays at all
    params = {name: jax.ShapeDtypeStruct((r, c), dtype, sharding=sharding)
              for name, r, c in matrices(args.scale)}
    importance = {name: jax.ShapeDtypeStruct(w.shape, jnp.float32, sharding=sharding)
                  for name, w in params.items()}
    memory = program_memory(params, importance, sharding, args.granularity)[1]
    return {"devices": len(devices), **peaks(params, importance, memory, len(devices))}
  host_w, host_h = make_layer(args.scale, dtype)
  params = {k: jax.device_put(v, sharding) for k, v in host_w.items()}
  importance = {k: jax.device_put(v, sharding) for k, v in host_h.items()}
  del host_w, host_h
  jax.block_until_ready((params, importance))

  start = time.perf_counter()
  q = gkq.quantize(params, importance, rules, granularity=args.granularity)
  jax.block_until_ready(q)
  seconds = time.perf_counter() - start

  programs, memory = program_memory(params, importance, sharding, args.granularity)
  key = jax.random.PRNGKey(0)
  start = time.perf_counter()
  mine = {name: programs[w.shape](key, w, importance[name]) for name, w in params.items()}
  jax.block_until_ready(mine)
  run_seconds = time.perf_counter() - start

  def digest(x) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()

  def spec_of(x) -> str:
    s = x.sharding
    return str(s.spec) if isinstance(s, NamedSharding) else type(s).__name__

  hashes, same_as_quantize = {}, True
  for name in params:
    book, idx = q[name].codebook, q[name].indices
    hashes[name] = {"codebook": digest(book), "indices": digest(idx),
                    "codebook_shape": list(book.shape), "indices_dtype": str(idx.dtype)}
    if args.granularity == "layer":  # 16 values a matrix: compared by value, not only hash
      hashes[name]["values"] = np.asarray(book, np.float64).reshape(-1).tolist()
      # and by the weighted SSE they give (the measurement gathers; quantize did not)
      x = np.asarray(params[name], np.float64)
      err = x - np.asarray(book, np.float64).reshape(-1)[np.asarray(idx)]
      hashes[name]["sse"] = float(np.sum(np.asarray(importance[name], np.float64) * err * err))
    same_as_quantize &= (digest(mine[name][0]) == hashes[name]["codebook"]
                         and digest(mine[name][1]) == hashes[name]["indices"])

  return {
      "devices": len(devices),
      "platform": devices[0].platform,
      "shapes": {name: list(w.shape) for name, w in params.items()},
      "quantize_seconds": seconds,
      "run_seconds": run_seconds,
      **peaks(params, importance, memory, len(devices)),
      "hashes": hashes,
      "lowered_equals_quantize": bool(same_as_quantize),
      "indices_spec": spec_of(q["q"].indices),
      "codebook_spec": spec_of(q["q"].codebook),
  }


def program_memory(params, importance, sharding, granularity):
  """quantize's own shard-local program of each matrix shape (on one device too,
  where quantize itself takes its unsharded path), compiled: ({shape: compiled},
  {shape: memory_analysis() bytes per device})."""
  import jax

  import gkq_jax as gkq

  quantize_lib = sys.modules["gkq_jax.quantize"]
  key = jax.random.PRNGKey(0)
  programs, memory = {}, {}
  for name, w in params.items():
    if w.shape in programs:
      continue
    run = quantize_lib._shard_local_clusterer(sharding, w.shape, 2 ** BITS, (), None,
                                              gkq.LeafAxes(), True, granularity)
    compiled = run.lower(key, w, importance[name]).compile()
    stats = compiled.memory_analysis()
    programs[w.shape] = compiled
    memory[w.shape] = {"argument": stats.argument_size_in_bytes,
                       "output": stats.output_size_in_bytes,
                       "temp": stats.temp_size_in_bytes,
                       "alias": stats.alias_size_in_bytes}
  return programs, memory


def peaks(params, importance, memory, devices: int) -> dict:
  """The largest matrix's program peak and the layer's, per device, and their ratios."""
  import numpy as np

  largest = max(memory, key=lambda s: s[0] * s[1])
  big = memory[largest]
  peak = big["argument"] + big["output"] + big["temp"] - big["alias"]
  nbytes = lambda a: int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
  layer_shard = sum(nbytes(w) + nbytes(h) for w, h in zip(params.values(),
                                                        importance.values())) // devices
  outputs = sum(memory[w.shape]["output"] for w in params.values())
  layer_peak = layer_shard + outputs + max(m["temp"] for m in memory.values())
  return {"largest_matrix": list(largest), "largest_memory": big, "largest_peak_bytes": peak,
          "largest_peak_ratio": peak / big["argument"], "layer_shard_bytes": layer_shard,
          "layer_peak_bytes": layer_peak, "layer_peak_ratio": layer_peak / layer_shard}


def run_child(n: int, args) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={n}").strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n), "--scale",
         str(args.scale), "--dtype", args.dtype, "--granularity", args.granularity]
  if args.memory_only:
    cmd.append("--memory-only")
  done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> float:
  return n / 2 ** 20


COLUMNS = ["devices", "quantize s (compile included)", "run s (compiled)",
           "weight + importance per device, largest matrix (MiB)",
           "program peak per device (MiB)", "peak / weight + importance",
           "layer peak / layer shard", "equal to 1 device", "indices spec", "codebook spec",
           "measured program = quantize's arrays"]


def table_rows(results: list[dict]) -> list[list]:
  reference = results[0]["hashes"]
  rows = []
  for r in results:
    equal = sum(r["hashes"][k]["codebook"] == reference[k]["codebook"]
                and r["hashes"][k]["indices"] == reference[k]["indices"] for k in reference)
    same = ("reference" if r is results[0] else
            ("yes" if equal == len(reference) else "no") + f" ({equal}/{len(reference)} matrices)")
    if r is not results[0] and "values" in reference[next(iter(reference))]:
      # Per layer the histograms add the devices' parts: float32 sums in another order.
      same_idx = sum(r["hashes"][k]["indices"] == reference[k]["indices"] for k in reference)
      drift = max(max(abs(a - b) for a, b in zip(r["hashes"][k]["values"],
                                                  reference[k]["values"])) for k in reference)
      ratio = max(r["hashes"][k]["sse"] / reference[k]["sse"] for k in reference)
      same += (f"; indices {same_idx}/{len(reference)}, codebooks within {drift:.1e}, "
               f"weighted SSE at most {ratio:.6f}x")
    rows.append([r["devices"], round(r["quantize_seconds"], 1), round(r["run_seconds"], 1),
                 round(mib(r["largest_memory"]["argument"]), 2),
                 round(mib(r["largest_peak_bytes"]), 2), round(r["largest_peak_ratio"], 2),
                 round(r["layer_peak_ratio"], 2), same, r["indices_spec"], r["codebook_spec"],
                 "yes" if r["lowered_equals_quantize"] else "no"])
  return rows


def commit() -> str | None:
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                          capture_output=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           text=True, capture_output=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return head + ("+dirty" if dirty else "")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scale", type=float, default=1.0,
                      help="every dimension times this (1.0: Llama-2-7B; 0.25: each /4)")
  parser.add_argument("--devices", default="1,2,4,8",
                      help="device counts, comma-separated; the first is the reference")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                      help="the weights' dtype (importance is float32)")
  parser.add_argument("--granularity", default="channel", choices=("channel", "layer"),
                      help="a codebook per output channel (shard by shard) or per matrix "
                      "(histograms summed over the devices)")
  parser.add_argument("--memory-only", action="store_true",
                      help="only compile each device count's programs and print their memory "
                      "(no arrays, no clustering: for scales too large to run here)")
  parser.add_argument("--machine", default=None, help="the machine, for --json")
  parser.add_argument("--note", default="", help="a note for --json (how it was run)")
  parser.add_argument("--json", default=None, help="write a results/*.json summary here")
  parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args)))
    return

  counts = [int(n) for n in args.devices.split(",")]
  load = os.getloadavg()[0]
  shapes = matrices(args.scale)
  total = sum(r * c for _, r, c in shapes)
  print(f"Llama-2-7B-shaped decoder layer x {args.scale}: "
        + ", ".join(f"{n} {r}x{c}" for n, r, c in shapes)
        + f" ({total:,} weights, {args.dtype}; importance float32), K = {2 ** BITS} per "
        f"{'output channel' if args.granularity == 'channel' else 'matrix'}, sharded "
        f"P(None, 'model'); {os.cpu_count()} CPUs\n", flush=True)
  if args.memory_only:
    for n in counts:
      r = run_child(n, args)
      shape = "x".join(str(d) for d in r["largest_matrix"])
      print(f"{n} device(s): {r['largest_peak_ratio']:.2f}x the largest matrix's shard "
            f"({shape}, {mib(r['largest_peak_bytes']):.1f} MiB of "
            f"{mib(r['largest_memory']['argument']):.1f} MiB weight + importance), layer "
            f"{r['layer_peak_ratio']:.2f}x", flush=True)
    return
  results = []
  for n in counts:
    start = time.perf_counter()
    results.append(run_child(n, args))
    r = results[-1]
    print(f"{n} device(s): quantize {r['quantize_seconds']:.1f} s, shard-local programs "
          f"{r['run_seconds']:.1f} s, peak {r['largest_peak_ratio']:.2f}x the largest matrix's "
          f"shard (layer {r['layer_peak_ratio']:.2f}x), lowered == quantize: "
          f"{r['lowered_equals_quantize']} ({time.perf_counter() - start:.0f} s in all)",
          flush=True)
  rows = table_rows(results)
  print("\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
  for row in rows:
    print("| " + " | ".join(str(c) for c in row) + " |")
  if args.json:
    import jax

    summary = {
        "command": "python benchmarks/sharded.py " + shlex.join(sys.argv[1:]),
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
        "machine": args.machine or (
            f"{os.cpu_count()}-core CPU ({platform.machine()}, jax {jax.__version__}; load "
            f"average {load:.1f} at the start), the simulated devices threads sharing its cores"),
        "source": "written by benchmarks/sharded.py --json" + (f"; {args.note}" if args.note
                                                                else ""),
        "config": {"scale": args.scale, "dtype": args.dtype, "bits": BITS,
                   "granularity": args.granularity,
                   "clusters": 2 ** BITS, "devices": counts,
                   "shapes": {n: [r, c] for n, r, c in shapes}},
        "columns": COLUMNS,
        "rows": rows,
        "runs": [{k: v for k, v in r.items() if k != "hashes"} for r in results],
        "hashes": results[0]["hashes"],
    }
    with open(args.json, "w") as f:
      f.write(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
  main()
