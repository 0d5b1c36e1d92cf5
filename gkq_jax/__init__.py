"""gkq_jax: gradient-guided k-means weight sharing for JAX / Flax models."""

from gkq_jax.exact1d import optimal_centroids
from gkq_jax.importance import IMPORTANCE_KINDS, compute_importance
from gkq_jax.kmeans1d import Clustering, grouped_kmeans_1d, kmeans_1d, weighted_error
from gkq_jax.kmeans_vectors import kmeans_vectors
from gkq_jax.quantize import (GRANULARITIES, ClusteredArray, clustered_leaves, dequantize,
                              quantize)
from gkq_jax.rules import DEFAULT_RULES, ClusterRule, bits_rule
