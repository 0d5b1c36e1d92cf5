"""Running from packed weights: the lookup-table kernel (GPU) and the packed forward (CPU).

    python benchmarks/lut_matmul.py [--part gpu|cpu|both] [--repeats 20] [--smoke]

GPU part (needs a GPU; on any other backend it says so and stops): x (M x K,
bfloat16) times a K x N weight stored as packed 4- or 3-bit indices with one
codebook of 2^bits values per output channel, for M = 1, 4, 16, 64 and the
Llama-2-7B shapes 4096 x 4096 and 4096 x 11008: the Pallas kernel
(``gkq.lut_matmul``, both lookups) against a bf16 dense dot of the same weight and against
dequantize-then-dot in XLA (``gkq.lut_matmul_reference``). Median of
``--repeats`` timed calls after a warm-up; "MB read" is what each must read at
least (weights in their stored form, codebooks, x). ``--smoke`` runs the same
code on tiny shapes in Pallas interpret mode, to check the script off-GPU
(its times mean nothing).

CPU part: LeNet-300-100 (28 x 28 inputs) and ResNet-34 (CIFAR stem, 32 x 32
inputs), every kernel clustered to 4 bits per layer with gkq.quantize and
packed: the packed forward (``gkq.apply_packed``, XLA path) against the dense
float32 forward, batch 1 and 256, median wall ms. Memory: each compiled
executable's ``memory_analysis()`` (argument bytes: weights, batch statistics
and input; temp bytes: activations and, for the packed forward, its dense
weight copies), and live-buffer accounting of XLA's schedule for the packed
forward (:func:`dense_copies_peak`): the most bytes of dequantized weights
alive at any one step; "weights held" = packed bytes + that peak. The same
accounting of all buffers but the arguments gives each forward's "live peak"
(activations, and the packed forward's dense copies): temp bytes can exceed
it, as XLA places temporaries at fixed offsets in one allocation. Target: at
most packed bytes + the largest layer's float32 bytes (the dense forward holds
all float32 weights).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import gkq_jax as gkq  # noqa: E402

MB = 1e6


def median_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def packed_weight(rows, cols, bits, seed=0):
  rng = np.random.default_rng(seed)
  k = 2 ** bits
  book = np.sort(rng.standard_t(5, (cols, k)) * 0.02, axis=1).astype(np.float32)
  idx = rng.integers(0, k, (rows, cols)).astype(np.uint8)
  return gkq.pack(gkq.ClusteredArray(jnp.asarray(book), jnp.asarray(idx)), bits)


def gpu_part(args):
  interpret = args.smoke
  if jax.default_backend() != "gpu" and not interpret:
    print("GPU part: not measured (backend is "
          f"{jax.default_backend()}; run on a GPU, or --smoke for an interpret-mode check).")
    return
  shapes = [(256, 256), (256, 512)] if args.smoke else [(4096, 4096), (4096, 11008)]
  batches = (1, 4) if args.smoke else (1, 4, 16, 64)
  print(f"GPU part: {jax.devices()[0].device_kind}" + (" (interpret mode: times mean nothing)"
                                                       if interpret else "") + "\n")
  print("| K x N | bits | M | kernel ms (select) | kernel ms (gather) | bf16 dot ms | "
        "dequant+dot ms | best kernel vs bf16 dot | MB read kernel / bf16 dot |")
  print("|---|---|---|---|---|---|---|---|---|")
  kernel = jax.jit(lambda x, w: gkq.lut_matmul(x, w, interpret=interpret))
  gather = jax.jit(lambda x, w: gkq.lut_matmul(x, w, interpret=interpret, lookup="gather"))
  dense_dot = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32
                                           ).astype(x.dtype))
  dequant_dot = jax.jit(gkq.lut_matmul_reference)
  for rows, cols in shapes:
    for bits in (4, 3):
      w = packed_weight(rows, cols, bits)
      dense = jax.block_until_ready(w.dequantize().astype(jnp.bfloat16))
      for m in batches:
        x = jnp.asarray(np.random.default_rng(m).standard_normal((m, rows)), jnp.bfloat16)
        err = float(jnp.max(jnp.abs(kernel(x, w).astype(jnp.float32)
                                    - dense_dot(x, dense).astype(jnp.float32))))
        err = max(err, float(jnp.max(jnp.abs(gather(x, w).astype(jnp.float32)
                                              - dense_dot(x, dense).astype(jnp.float32)))))
        t_kernel = median_ms(kernel, x, w, repeats=args.repeats)
        t_gather = median_ms(gather, x, w, repeats=args.repeats)
        t_dense = median_ms(dense_dot, x, dense, repeats=args.repeats)
        t_deq = median_ms(dequant_dot, x, w, repeats=args.repeats)
        x_bytes = m * rows * 2
        read_kernel = (w.packed.size + w.codebook.size * 2 + x_bytes) / MB
        read_dense = (rows * cols * 2 + x_bytes) / MB
        print(f"| {rows} x {cols} | {bits} | {m} | {t_kernel:.3f} | {t_gather:.3f} | "
              f"{t_dense:.3f} | {t_deq:.3f} | {t_dense / min(t_kernel, t_gather):.2f}x | "
              f"{read_kernel:.1f} / {read_dense:.1f} |"
              + (f" max abs diff {err:.3g}" if args.smoke else ""), flush=True)


def _models():
  from gkq_jax.job.models import MLP, ResNet34
  return [("LeNet-300-100", MLP((300, 100)), (28, 28, 1)), ("ResNet-34", ResNet34(10), (32, 32, 3))]


def _bytes(tree) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def dense_copies_peak(lowered) -> tuple[int, int, object]:
  """Live-buffer accounting of the compiled forward: the most bytes of dequantized (dense)
  weights alive at any step of XLA's schedule, the most bytes of all buffers but the
  arguments alive at any step, and the memory analysis.

  Compiles with XLA's dumps on and reads its buffer sizes and live ranges. Dense copies are
  the outputs of fusions holding the codebook gather (XLA names them ``*gather*``) and
  same-size copies / transposes / bitcasts made of them.
  """
  with tempfile.TemporaryDirectory() as dump:
    compiled = lowered.compile(compiler_options={"xla_dump_to": dump,
                                                 "xla_dump_hlo_as_text": True})
    def read(suffix):
      (name,) = [f for f in os.listdir(dump) if f.endswith(suffix)]
      with open(os.path.join(dump, name)) as f:
        return f.read()
    hlo = read("cpu_after_optimizations.txt")
    assignment = read("cpu_after_optimizations-buffer-assignment.txt")
    live = read("cpu_after_optimizations-live-range.txt")
  sizes: dict[str, int] = {}
  slices: dict[str, set] = {}  # value -> (allocation, offset, size): values sharing one count once
  arguments = set()
  for allocation, body in re.findall(r"^allocation (\d+): ([^\n]*(?:\n value: [^\n]*)*)",
                                     assignment, re.M):
    for name, size, offset in re.findall(
        r"value: <\d+ ([\w.\-]+) @[^>]*> \(size=(\d+),offset=(\d+)", body):
      sizes[name] = sizes.get(name, 0) + int(size)
      slices.setdefault(name, set()).add((allocation, int(offset), int(size)))
      if ", parameter " in body.split("\n", 1)[0]:
        arguments.add(name)
  entry = hlo[hlo.index("\nENTRY"):]
  operands = {m.group(1): set(re.findall(r"%([\w.\-]+)", m.group(2)))
              for m in re.finditer(r"^  (?:ROOT )?%([\w.\-]+) = (.*)$", entry, re.M)}
  copies = {n for n in operands if "gather" in n}
  grown = True
  while grown:  # layout copies, transposes and bitcasts of a dense copy are dense copies too
    more = {n for n, ops in operands.items() if n not in copies and ops & copies
            and re.match(r"(copy|transpose|bitcast)", n)
            and sizes.get(n, 0) == max(sizes.get(o, 0) for o in ops & copies)}
    copies |= more
    grown = bool(more)
  ranges = [(n, int(a), int(b)) for n, a, b in
            re.findall(r"^    ([\w.\-]+)\{[^}]*\}:(\d+)-(\d+)$", live, re.M) if n in copies]
  steps = max((b for _, _, b in ranges), default=0) + 1
  peak = max((sum(sizes.get(n, 0) for n, a, b in ranges if a <= t <= b)
              for t in range(steps)), default=0)
  others = [(n, int(a), int(b)) for n, a, b in
            re.findall(r"^    ([\w.\-]+)\{[^}]*\}:(\d+)-(\d+)$", live, re.M)
            if n in slices and n not in arguments]
  live_peak = max((sum(size for _, _, size in set().union(*(
      slices[n] for n, a, b in others if a <= t <= b)))
      for t in range(max((b for _, _, b in others), default=0) + 1)), default=0)
  return peak, live_peak, compiled.memory_analysis()


def cpu_part(args):
  print(f"CPU part: {os.cpu_count()} CPUs, {jax.default_backend()} backend\n")
  latency, memory = [], []
  for name, model, shape in _models():
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    packed = gkq.pack_tree(gkq.quantize(params, None, [gkq.bits_rule("kernel$", 4)]))
    fp32, packed_bytes = _bytes(params), _bytes(packed)
    largest = max(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))
    dense_fn = jax.jit(lambda v, x, model=model: model.apply(v, x))
    packed_fn = jax.jit(lambda p, x, model=model, rest=rest: gkq.apply_packed(
        model, {**rest, "params": p}, x, kernel="xla"))
    for batch in (1, 256):
      x = jnp.asarray(np.random.default_rng(batch).standard_normal((batch,) + shape), jnp.float32)
      dense_ref = gkq.dequantize(gkq.unpack_tree(packed))
      diff = float(jnp.max(jnp.abs(packed_fn(packed, x) - dense_fn({**rest, "params": dense_ref},
                                                                    x))))
      few = max(3, args.repeats // 5)
      repeats = args.repeats if batch == 1 or name.startswith("LeNet") else few
      t_dense = median_ms(dense_fn, variables, x, repeats=repeats)
      t_packed = median_ms(packed_fn, packed, x, repeats=repeats)
      latency.append((name, batch, t_dense, t_packed, diff))
      _, live_dense, m_dense = dense_copies_peak(dense_fn.lower(variables, x))
      copies, live_packed, m_packed = dense_copies_peak(packed_fn.lower(packed, x))
      memory.append((name, batch, fp32, packed_bytes, largest, m_dense.argument_size_in_bytes,
                     m_dense.temp_size_in_bytes, live_dense, m_packed.argument_size_in_bytes,
                     m_packed.temp_size_in_bytes, live_packed, copies, packed_bytes + copies,
                     packed_bytes + largest))
      print(f"  {name} batch {batch}: done", file=sys.stderr, flush=True)
  print("| model | batch | dense fp32 ms | packed ms | packed / dense | max abs logit diff |")
  print("|---|---|---|---|---|---|")
  for name, batch, t_dense, t_packed, diff in latency:
    print(f"| {name} | {batch} | {t_dense:.2f} | {t_packed:.2f} | {t_packed / t_dense:.2f} | "
          f"{diff:.2g} |")
  print("\n| model | batch | fp32 weights MB | packed MB | largest layer fp32 MB | dense fwd: "
        "args / temp / live peak MB | packed fwd: args / temp / live peak MB | dense copies "
        "alive at once, most MB | weights held: packed + copies MB | target: packed + largest "
        "MB | met |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for (name, batch, fp32, pb, largest, da, dt, dl, pa, pt, pl, copies, held, target) in memory:
    print(f"| {name} | {batch} | {fp32 / MB:.2f} | {pb / MB:.2f} | {largest / MB:.2f} | "
          f"{da / MB:.2f} / {dt / MB:.2f} / {dl / MB:.2f} | {pa / MB:.2f} / {pt / MB:.2f} / "
          f"{pl / MB:.2f} | {copies / MB:.2f} | {held / MB:.2f} | {target / MB:.2f} | "
          f"{'yes' if held <= target else 'no'} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", choices=("gpu", "cpu", "both"), default="both")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--smoke", action="store_true",
                      help="GPU part on tiny shapes in interpret mode (checks the script)")
  args = parser.parse_args()
  if args.part in ("gpu", "both"):
    gpu_part(args)
    print()
  if args.part in ("cpu", "both"):
    cpu_part(args)


if __name__ == "__main__":
  main()
