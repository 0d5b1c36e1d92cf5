"""gkq_jax: gradient-guided k-means weight sharing for JAX / Flax models."""

from gkq_jax.encode import CorruptFileError, load, save
from gkq_jax.exact1d import optimal_centroids
from gkq_jax.importance import IMPORTANCE_KINDS, compute_importance
from gkq_jax.kmeans1d import Clustering, grouped_kmeans_1d, kmeans_1d, weighted_error
from gkq_jax.kmeans_vectors import kmeans_vectors
from gkq_jax.prune import apply_masks, keep_pruned, magnitude_masks
from gkq_jax.quantize import (GRANULARITIES, ClusteredArray, clustered_leaves, dequantize,
                              is_clustered, quantize)
from gkq_jax.rules import DEFAULT_RULES, ClusterRule, bits_rule
from gkq_jax.share import refresh_codebooks, share_centroids

__all__ = [
    "CorruptFileError", "load", "save", "optimal_centroids", "IMPORTANCE_KINDS",
    "compute_importance", "Clustering", "grouped_kmeans_1d", "kmeans_1d", "weighted_error",
    "kmeans_vectors", "apply_masks", "keep_pruned", "magnitude_masks", "GRANULARITIES",
    "ClusteredArray", "clustered_leaves", "dequantize", "is_clustered", "quantize", "DEFAULT_RULES",
    "ClusterRule", "bits_rule", "refresh_codebooks", "share_centroids",
]
