"""Mutations that must be killed: break one promise of the product, run the tests
that guard it, and check that they fail.

Each mutant replaces one exact snippet of one file. It is applied to a copy of
the working tree in a temporary folder (the checkout itself is never touched),
where the named tests run; a mutant is *killed* when they fail. Before the
mutants, the same tests run unmutated and must pass, or the kills mean nothing.
A snippet that is no longer found exactly once makes its mutant *stale*: update
the table to the code.

  python tools/mutants.py            # every mutant (a few minutes on 2 CPU cores)
  python tools/mutants.py --list     # the table
  python tools/mutants.py -k l1 -k restore   # mutants whose name holds a word
  python tools/mutants.py --show l1-median   # the copy is kept; prints its folder

Not part of the test suite (``pytest`` never collects this file).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", "runs", ".venv", "__pycache__", "*.egg-info",
                                 ".pytest_cache", "*.gkq")


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  promise: str  # what the product claims that this mutation breaks
  path: str
  old: str
  new: str
  tests: tuple[str, ...]  # pytest node ids that must fail


MUTANTS = (
    Mutant("reassign-ignores-price",
           "ECSQ re-assignment: distortion + price x code length (the rate stays controlled)",
           "gkq_jax/reassign.py",
           "jnp.where(price > 0, h * err * err + price * bits[:, j][rows], err * err)",
           "err * err",
           ("tests/library/test_reassign.py::"
            "test_a_price_never_increases_the_ecsq_objective_and_prunes_more",)),
    Mutant("reassign-unweighted-means",
           "re-fitted entries are importance-weighted means of their members",
           "gkq_jax/reassign.py",
           "    mass = jax.ops.segment_sum(h, seg, n)\n"
           "    mean = jax.ops.segment_sum(h * w, seg, n)",
           "    mass = jax.ops.segment_sum(jnp.ones_like(h), seg, n)\n"
           "    mean = jax.ops.segment_sum(w, seg, n)",
           ("tests/library/test_reassign.py::"
            "test_price_zero_takes_the_nearest_entry_and_weighted_means",)),
    Mutant("straight-through-blocked",
           "QAT through codebooks: the gradient passes straight through to the float weights",
           "gkq_jax/reassign.py",
           "  return primals[1], tangents[0]",
           "  return primals[1], jnp.zeros_like(tangents[0])",
           ("tests/library/test_reassign.py::"
            "test_fake_reassign_forward_is_the_assigned_value_and_gradient_passes_through",)),
    Mutant("quantize-ignores-importance",
           "gradient-weighted clustering of whole models",
           "gkq_jax/quantize.py",
           "result = grouped_kmeans_1d(x, h, sizes, group_k",
           "result = grouped_kmeans_1d(x, None, sizes, group_k",
           ("tests/library/test_quantize.py::"
            "test_importance_on_one_layer_changes_that_codebook_only",
            "tests/library/test_quantize.py::"
            "test_gradient_weighting_beats_plain_kmeans_on_the_loss_at_2_bits")),
    Mutant("restore-disabled",
           "rerunning the same command resumes the interrupted stage",
           "gkq_jax/job/training/train.py",
           "  if not directory.exists():\n    return None, target, None",
           "  if True:\n    return None, target, None",
           ("tests/job/test_train.py::test_killed_run_resumes_to_the_same_result",
            "tests/job/test_pipeline.py::test_interrupted_finetune_resumes")),
    Mutant("last-rule-wins",
           "the first matching rule decides",
           "gkq_jax/rules.py",
           "  for rule in rules:\n    if re.search(rule.pattern, path):",
           "  for rule in reversed(rules):\n    if re.search(rule.pattern, path):",
           ("tests/library/test_rules.py::test_first_matching_rule_wins",
            "tests/job/test_configs.py::"
            "test_quantize_rules_entries_come_before_the_default_bits")),
    Mutant("rules-entries-after-default",
           "quantize.rules come before the default bits (Deep Compression's 5-bit layer)",
           "gkq_jax/job/context.py",
           '  rules.append(gkq.bits_rule(r"(^|/)kernel$", int(config.quantize.bits)))',
           '  rules.insert(0, gkq.bits_rule(r"(^|/)kernel$", int(config.quantize.bits)))',
           ("tests/job/test_configs.py::"
            "test_quantize_rules_entries_come_before_the_default_bits",)),
    Mutant("l1-median-is-mean",
           "objective='l1': weighted-median centroids on the histogram",
           "gkq_jax/_lloyd.py",
           '  if objective == "l2":\n    s0 = hist_lib.prefix(hist.cum_moment',
           '  if True:\n    s0 = hist_lib.prefix(hist.cum_moment',
           ("tests/library/test_kmeans1d.py::"
            "test_hist_l1_update_moves_centroids_to_weighted_medians",)),
    Mutant("keep-pruned-after-inner",
           "pruned weights never move, whatever the inner optimiser adds",
           "gkq_jax/prune.py",
           "    return zero(updates, state.masks), KeepPrunedState(",
           "    return updates, KeepPrunedState(",
           ("tests/library/test_prune.py::"
            "test_keep_pruned_zeroes_what_the_inner_optimiser_adds",)),
    Mutant("share-plain-p-plus-u",
           "members of a cluster land on one value by construction (issue 20)",
           "gkq_jax/share.py",
           "  step = _gather(moved, seg).astype(work) - weights.astype(work)\n",
           "  step = _gather(total * scale, seg).astype(work)\n",
           ("tests/library/test_share_exact.py::"
            "test_a_member_knocked_one_ulp_off_its_value_is_pulled_back",)),
    Mutant("runtime-wraps-negative-start",
           "the packed forward equals the dense forward for every input (issue 26)",
           "gkq_jax/flax_runtime.py",
           "array.shape[0], allow_negative_indices=False)",
           "array.shape[0])",
           ("tests/library/test_flax_runtime.py::"
            "test_the_packed_forward_is_the_dense_forward_whatever_the_input_starts_with",)),
    Mutant("channel-axes-last-only",
           "per-channel codebooks serve every output feature of a multi-axis kernel (issue 26)",
           "gkq_jax/quantize.py",
           "  channels = int(np.prod(shape[len(shape) - layout.channels:])) if granularity",
           "  channels = int(np.prod(shape[len(shape) - 1:])) if granularity",
           ("tests/library/test_axes.py::"
            "test_dense_general_gets_a_codebook_per_output_feature",)),
    Mutant("stack-clustered-as-one",
           "each layer of an nn.scan stack is clustered as the unscanned layer (issue 26)",
           "gkq_jax/quantize.py",
           "  layers = int(np.prod(shape[:layout.stacked]))",
           "  layers = 1",
           ("tests/library/test_axes.py::"
            "test_a_scanned_stack_is_clustered_and_run_as_its_unscanned_twin",)),
    Mutant("vector-points-reshaped",
           "granularity='vector' clusters the spatial filters",
           "gkq_jax/_vectors.py",
           "  return moved.reshape((-1, int(np.prod(vector_shape)))), rest",
           "  return a.reshape((-1, int(np.prod(vector_shape)))), rest",
           ("tests/library/test_quantize.py::"
            "test_vector_granularity_keeps_every_filter_in_place",)),
    Mutant("key-ignored-1d",
           "random starts are a pure function of the key",
           "gkq_jax/kmeans1d.py",
           "k_init, _ = jax.random.split(key)",
           "k_init, _ = jax.random.split(jax.random.PRNGKey(0))",
           ("tests/library/test_kmeans1d.py::test_random_starts_are_a_pure_function_of_the_key",)),
    Mutant("key-ignored-vectors",
           "random vector starts are a pure function of the key",
           "gkq_jax/kmeans_vectors.py",
           "  idx = jax.random.choice(key, x.shape[0]",
           "  idx = jax.random.choice(jax.random.PRNGKey(0), x.shape[0]",
           ("tests/library/test_kmeans_vectors.py::"
            "test_random_vector_starts_are_a_pure_function_of_the_key",)),
    Mutant("distillation-no-op",
           "finetune.distill / prune.distill pull towards the uncompressed model",
           "gkq_jax/job/context.py",
           "  if weight <= 0:\n    return None",
           "  if True:\n    return None",
           ("tests/job/test_pipeline.py::test_finetune_stage_distils_and_sums_cluster_updates",)),
    Mutant("sum-reduce-is-mean",
           "finetune.reduce='sum': Deep Compression's centroid gradient",
           "gkq_jax/job/modes/compress.py",
           "gkq.share_centroids(quantized, cfg.reduce)",
           'gkq.share_centroids(quantized, "mean")',
           ("tests/job/test_pipeline.py::test_finetune_stage_distils_and_sums_cluster_updates",)),
    # Behaviours whose tests used to be too weak to notice a breakage.
    Mutant("dp-no-fallback",
           "init='dp' becomes k-means++ above 32 clusters",
           "gkq_jax/_inits.py",
           'if name == "dp" and s.K > DP_MAX_CLUSTERS:',
           'if False and name == "dp" and s.K > DP_MAX_CLUSTERS:',
           ("tests/library/test_kmeans1d.py::"
            "test_dp_start_falls_back_to_kmeanspp_above_32_clusters",)),
    Mutant("zero-importance-fallback-global",
           "only a group whose importance is all zero falls back to uniform weights",
           "gkq_jax/kmeans1d.py",
           "frame = hist_lib.Frame((lo + hi) / 2, (hi - lo) / 2, mass <= 0)",
           "frame = hist_lib.Frame((lo + hi) / 2, (hi - lo) / 2,\n"
           "                         jnp.broadcast_to(jnp.any(mass <= 0), mass.shape))",
           ("tests/library/test_kmeans1d.py::"
            "test_all_zero_importance_of_one_group_in_a_grouped_call",)),
    Mutant("huffman-uncapped",
           "code lengths of at most 16 bits (one-lookup decoding)",
           "gkq_jax/huffman.py",
           "    if depth[:n].max() <= MAX_CODE_BITS:",
           "    if True:",
           ("tests/library/test_huffman.py",)),
    Mutant("combined-budget-ignored",
           "granularity='combined' splits budget= centroids across layers",
           "gkq_jax/quantize.py",
           "total = budget if budget is not None else int(sum(ks))",
           "total = int(sum(ks))",
           ("tests/library/test_quantize.py::test_combined_budget_is_split_by_layer_size",)),
    Mutant("vector-assignment-unweighted",
           "per-coordinate importance changes which centroid a vector joins",
           "gkq_jax/kmeans_vectors.py",
           "    a = jnp.argmin(weighted_sq_distances(x, h, c), axis=1)",
           "    a = jnp.argmin(weighted_sq_distances(x, jnp.ones_like(h), c), axis=1)",
           ("tests/library/test_kmeans_vectors.py::test_importance_changes_vector_assignment",)),
    # Issue 25: silent mode switches, lossless codebooks, nnx state, long studies, file size.
    Mutant("none-importance-silent",
           "a clustered leaf with None importance among weighted ones is named in a warning",
           "gkq_jax/quantize.py",
           '    warn_unweighted("quantize", [paths[i] for i in chosen], '
           '[imps[i] for i in chosen])\n',
           "    pass\n",
           ("tests/library/test_quantize.py::"
            "test_a_clustered_leaf_with_none_importance_beside_weighted_ones_warns",)),
    Mutant("lossless-groups-off",
           "a group with at most K distinct values decodes to exactly its values",
           "gkq_jax/kmeans1d.py",
           "  return Clustering(*_distinct.exact_groups(values, seg, k, out.centroids, "
           "out.assignments))",
           "  return out",
           ("tests/library/test_lossless.py::"
            "test_groups_with_at_most_k_distinct_values_decode_exactly",)),
    Mutant("refresh-drift-members-only",
           "refresh_codebooks warns whenever its result does not decode to the params",
           "gkq_jax/share.py",
           "    off = jnp.abs(out.dequantize().astype(jnp.float32).reshape(-1) - x)",
           "    off = jnp.where((hi != lo)[seg],\n                    "
           "jnp.abs(out.dequantize().astype(jnp.float32).reshape(-1) - x), 0.0)",
           ("tests/library/test_share.py::"
            "test_refresh_codebooks_warns_how_far_weights_were_from_what_they_now_decode_to",)),
    Mutant("dead-rule-silent",
           "a rule an earlier rule shadows is named in a warning",
           "gkq_jax/rules.py",
           "    if all(r is not None for r in deciding):",
           "    if False:",
           ("tests/library/test_rules.py::test_a_rule_an_earlier_rule_shadows_warns_naming_both",)),
    Mutant("nnx-module-importance-off",
           "importance straight from an nnx module that mutates its state in __call__",
           "gkq_jax/importance.py",
           "  if isinstance(params, nnx.Module):",
           "  if False:",
           ("tests/library/test_flax_nnx.py::"
            "test_importance_straight_from_a_module_that_mutates_its_state",)),
    Mutant("survey-keeps-compiled",
           "a survey releases its compiled programs after every method (memory mappings)",
           "gkq_jax/job/modes/survey.py",
           "    rows.append(runner.row(name))\n    context.release_compiled()",
           "    rows.append(runner.row(name))\n    pass",
           ("tests/job/test_survey.py::test_compiled_programs_are_released_after_every_method",)),
    Mutant("uniform-grid-as-table",
           "a uniform grid codebook takes two numbers per channel in the file",
           "gkq_jax/encode.py",
           "  if k < 3:\n    return None",
           "  if True:\n    return None",
           ("tests/library/test_encode.py::test_uniform_grids_take_two_numbers_per_channel",)),
    Mutant("codebook-larger-than-weights",
           "no leaf of the file takes more bytes than the dense weights it replaces",
           "gkq_jax/encode.py",
           "    if book_bytes + index_bytes > dense_bytes:",
           "    if False:",
           ("tests/library/test_encode.py::test_no_leaf_takes_more_bytes_than_its_dense_weights",)),
    Mutant("default-workdir-without-variant",
           "the default workdir is runs/<config>-<variant>",
           "gkq_jax/job/run.py",
           'f"{name}-{variant}" if variant else name',
           "name",
           ("tests/job/test_cli.py::test_main_cli_smoke_and_locked_config",)),
)


def copy_tree(target: pathlib.Path) -> pathlib.Path:
  tree = target / "repo"
  shutil.copytree(ROOT, tree, ignore=IGNORED)
  return tree


def apply(tree: pathlib.Path, mutant: Mutant) -> str | None:
  """Applies the mutant in ``tree``; returns why it cannot (stale), or None."""
  path = tree / mutant.path
  if not path.exists():
    return f"{mutant.path} does not exist"
  text = path.read_text()
  count = text.count(mutant.old)
  if count != 1:
    return f"snippet found {count} times in {mutant.path}"
  path.write_text(text.replace(mutant.old, mutant.new))
  return None


def run_tests(tree: pathlib.Path, tests) -> tuple[int, float, str]:
  start = time.perf_counter()
  out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                        *tests], cwd=tree, capture_output=True, text=True)
  lines = [l for l in out.stdout.splitlines() if l.strip()]
  return out.returncode, time.perf_counter() - start, lines[-1] if lines else out.stderr[-200:]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("-k", action="append", default=[], help="run mutants whose name holds this")
  parser.add_argument("--list", action="store_true", help="print the table and exit")
  parser.add_argument("--show", help="apply this mutant to a kept copy and print its folder")
  args = parser.parse_args(argv)
  if args.list:
    for m in MUTANTS:
      print(f"{m.name:34s} {m.path:28s} {', '.join(t.split('::')[-1] for t in m.tests)}")
    return 0
  if args.show:
    mutant = next(m for m in MUTANTS if m.name == args.show)
    tree = copy_tree(pathlib.Path(tempfile.mkdtemp(prefix="mutant-")))
    print(apply(tree, mutant) or tree)
    return 0
  chosen = [m for m in MUTANTS if not args.k or any(k in m.name for k in args.k)]
  tests = sorted({t for m in chosen for t in m.tests})
  with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
    clean = copy_tree(pathlib.Path(tmp) / "clean")
    code, seconds, last = run_tests(clean, tests)
    print(f"unmutated: {'pass' if code == 0 else 'FAIL'} in {seconds:.0f} s ({last})")
    if code != 0:
      print("the guarding tests must pass before mutating: fix them first")
      return 2
    survivors = 0
    print("| mutant | file | result | seconds |")
    print("|---|---|---|---|")
    for mutant in chosen:
      tree = copy_tree(pathlib.Path(tmp) / mutant.name)
      stale = apply(tree, mutant)
      if stale:
        result, seconds = f"STALE: {stale}", 0.0
        survivors += 1
      else:
        code, seconds, last = run_tests(tree, mutant.tests)
        result = "killed" if code == 1 else ("SURVIVED" if code == 0 else f"error {code}: {last}")
        survivors += code == 0
      print(f"| {mutant.name} | {mutant.path} | {result} | {seconds:.0f} |", flush=True)
      shutil.rmtree(tree)
  return 1 if survivors else 0


if __name__ == "__main__":
  sys.exit(main())
