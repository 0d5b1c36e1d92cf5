"""gkq_jax: gradient-guided k-means weight sharing for JAX / Flax models.

The library needs jax, flax, optax and numpy only; the command-line job lives
in :mod:`gkq_jax.job` (``pip install 'gkq_jax[job]'``) and is never imported here.
"""

from gkq_jax._clustering import Clustering
from gkq_jax._outliers import SPARSE_SCOPES, SPARSE_SCORES
from gkq_jax._paths import named_leaves, path_string
from gkq_jax._version import __version__
from gkq_jax.allocation import ALLOCATIONS, BudgetResult, Choice, allocate, quantize_to_budget
from gkq_jax.allocation import METHODS as BUDGET_METHODS
from gkq_jax.axes import LeafAxes, layer_axes
from gkq_jax.channels import DEFAULT_CHUNK_VALUES, cluster_per_channel, stream_per_channel
from gkq_jax.clustered import (
    ClusteredArray,
    SparseOutliers,
    clustered_leaves,
    dequantize,
    is_clustered,
)
from gkq_jax.distill import distillation_loss, soft_targets
from gkq_jax.dkm import FORMS as DKM_FORMS
from gkq_jax.dkm import ON_DEGENERATE as DKM_ON_DEGENERATE
from gkq_jax.dkm import (
    KMeansRegularizerState,
    add_kmeans_regularizer,
    kmeans_regularizer,
    kmeans_regularizer_grad,
    kmeans_regularizer_init,
    merge_states,
    refresh_kmeans_regularizer,
    strength_ramp,
)
from gkq_jax.ecsq import (
    EntropyClustering,
    ecsq_1d,
    ecsq_for_rate,
    ecsq_objective,
    grouped_ecsq_1d,
    grouped_uniform_1d,
    uniform_for_rate,
)
from gkq_jax.encode import CorruptFileError, coded_bytes, load, save, stored_bytes
from gkq_jax.energy import EnergyCosts, EnergyEstimate, estimate_energy
from gkq_jax.error_feedback import error_feedback_indices, refit_codebooks
from gkq_jax.exact1d import optimal_centroids
from gkq_jax.flax_runtime import apply_packed, merge_packed
from gkq_jax.importance import IMPORTANCE_KINDS, compute_importance, damp_importance
from gkq_jax.kmeans1d import INITS as KMEANS_INITS
from gkq_jax.kmeans1d import METHODS as KMEANS_METHODS
from gkq_jax.kmeans1d import OBJECTIVES as KMEANS_OBJECTIVES
from gkq_jax.kmeans1d import grouped_kmeans_1d, kmeans_1d, weighted_error
from gkq_jax.kmeans_vectors import kmeans_vectors
from gkq_jax.lowrank import (
    choose_ranks,
    factorize,
    factorize_layer,
    factorize_params,
    low_rank_sparse,
    rank_for_energy,
    rank_for_ratio,
    reconstruct,
    singular_values,
    truncation_error,
)
from gkq_jax.lut_kernel import lut_matmul, lut_matmul_reference, lut_unsupported
from gkq_jax.packing import (
    PackedArray,
    is_packed,
    pack,
    pack_indices,
    pack_tree,
    unpack,
    unpack_indices,
    unpack_tree,
)
from gkq_jax.prune import (
    PRUNE_SCOPES,
    apply_masks,
    cubic_sparsity,
    keep_pruned,
    magnitude_masks,
    saliency_masks,
    sparsity,
)
from gkq_jax.qat import (
    batchnorm_scale,
    binary_codebook,
    binary_codebooks,
    binary_fake_quant,
    fake_binarize,
    fake_quantize,
    uniform_codebook,
    uniform_codebooks,
    uniform_fake_quant,
)
from gkq_jax.quantize import GRANULARITIES, quantize
from gkq_jax.reassign import fake_reassign, reassign
from gkq_jax.rtn import rtn_array, rtn_quantize
from gkq_jax.rules import (
    DEFAULT_RULES,
    ClusterRule,
    bits_rule,
    check_rules,
    clusters_for,
    selected_leaves,
)
from gkq_jax.sharded_file import load_sharded, save_sharded, shardings_of
from gkq_jax.share import codebook_params, refresh_codebooks, replace_codebooks, share_centroids
from gkq_jax.structured import (
    ChannelGroup,
    filter_norms,
    keep_channels,
    keep_largest,
    merge_similar_neurons,
    num_channels,
    remove_layers,
)

__all__ = [
    "__version__",
    "Clustering", "named_leaves", "path_string", "CorruptFileError", "load", "save",
    "optimal_centroids", "IMPORTANCE_KINDS", "compute_importance", "grouped_kmeans_1d",
    "kmeans_1d", "weighted_error", "kmeans_vectors", "apply_masks", "keep_pruned",
    "magnitude_masks", "sparsity", "GRANULARITIES", "ClusteredArray", "clustered_leaves",
    "dequantize", "is_clustered", "quantize", "DEFAULT_RULES", "ClusterRule", "bits_rule",
    "check_rules", "clusters_for", "selected_leaves", "refresh_codebooks", "share_centroids",
    "codebook_params", "replace_codebooks",
    "distillation_loss", "soft_targets", "choose_ranks", "factorize", "factorize_layer",
    "factorize_params", "low_rank_sparse", "rank_for_energy", "rank_for_ratio", "reconstruct",
    "singular_values", "truncation_error", "batchnorm_scale", "binary_codebook",
    "binary_codebooks", "binary_fake_quant", "fake_binarize", "fake_quantize",
    "uniform_codebook", "uniform_codebooks", "uniform_fake_quant", "ChannelGroup",
    "filter_norms", "keep_channels", "keep_largest", "merge_similar_neurons", "num_channels",
    "remove_layers",
    "EnergyCosts", "EnergyEstimate", "estimate_energy",
    "KMeansRegularizerState", "add_kmeans_regularizer", "kmeans_regularizer",
    "kmeans_regularizer_grad", "kmeans_regularizer_init", "merge_states",
    "refresh_kmeans_regularizer", "strength_ramp",
    "BudgetResult", "Choice", "allocate", "coded_bytes", "stored_bytes", "quantize_to_budget",
    "EntropyClustering", "ecsq_1d", "ecsq_for_rate", "ecsq_objective", "grouped_ecsq_1d",
    "grouped_uniform_1d", "uniform_for_rate", "cubic_sparsity", "saliency_masks",
    "damp_importance",
    "PackedArray", "is_packed", "pack", "pack_indices", "pack_tree", "unpack", "unpack_indices",
    "unpack_tree", "apply_packed", "merge_packed", "lut_matmul", "lut_matmul_reference",
    "lut_unsupported", "cluster_per_channel", "stream_per_channel", "fake_reassign", "reassign",
    "LeafAxes", "layer_axes", "rtn_array", "rtn_quantize", "error_feedback_indices",
    "refit_codebooks", "load_sharded", "save_sharded",
    "shardings_of", "SparseOutliers",
    # Option values the job and users validate against.
    "ALLOCATIONS", "BUDGET_METHODS", "DEFAULT_CHUNK_VALUES", "DKM_FORMS", "DKM_ON_DEGENERATE",
    "KMEANS_INITS", "KMEANS_METHODS", "KMEANS_OBJECTIVES", "PRUNE_SCOPES", "SPARSE_SCOPES",
    "SPARSE_SCORES",
]
