"""Codebook indices chosen with error feedback across input rows (GPTQ's update, any codebook).

Clustering a layer's weights one by one to their nearest shared value ignores that the
layer's output error is what matters: for inputs x with second moments H = E[x x^T], the
output error of channel c is (w_c - q_c)^T H (w_c - q_c). GPTQ (Frantar et al., 2023)
quantizes the input rows in turn and, after each row, moves the rows not yet quantized so
that they absorb its error as well as H allows (the optimal update given the inverse
Hessian's Cholesky factor). The same update works with any grid: here every row's weights
go to the nearest entry of *their channel's codebook*, so the codebooks that gradient- or
activation-weighted k-means found are kept and only the indices change.

Where it helps: codebooks per layer or per output channel over many input rows (on the LM of
configs/llama.py:ptq it cut 3-bit per-channel clustering's perplexity increase by more than
half). Small groups (a few dozen rows) have codebooks that hug their values; rows moved by
the feedback can fall outside them, and there it may not help.

Pure and jit-able: one ``lax.fori_loop`` over the input rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gkq_jax.clustered import ClusteredArray


def _upper_inverse_cholesky(hessian: jax.Array, damping: float) -> jax.Array:
  """U, upper triangular, with U^T U = (H + damping * mean(diag H) I)^-1. Inputs that are
  never non-zero (diag 0) get a unit diagonal: their weights never matter."""
  h = jnp.asarray(hessian, jnp.float32)
  diag = jnp.diagonal(h)
  h = h + jnp.diag(jnp.where(diag > 0, 0.0, 1.0))
  h = h + damping * jnp.mean(jnp.diagonal(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
  lower = jnp.linalg.cholesky(h)
  eye = jnp.eye(h.shape[0], dtype=h.dtype)
  inverse = jax.scipy.linalg.cho_solve((lower, True), eye)
  return jnp.linalg.cholesky(inverse).T


def error_feedback_indices(weight, clustered: ClusteredArray, hessian, *,
                           damping: float = 0.01) -> ClusteredArray:
  """``clustered`` (per-layer, per-channel or grouped codebooks of a 2-D weight of shape
  (inputs, channels)) with indices re-chosen row by row with GPTQ's error feedback.

  Args:
    weight: the original (inputs, channels) weight.
    clustered: its ClusteredArray; its codebook is kept.
    hessian: (inputs, inputs) second moments of the layer's inputs, E[x x^T].
    damping: added to H's diagonal as a fraction of its mean (GPTQ's 1%).
  """
  w = jnp.asarray(weight, jnp.float32)
  if w.ndim != 2 or clustered.vector_shape is not None or clustered.pinned_zero:
    raise ValueError("error_feedback_indices takes a 2-D (inputs, channels) weight with scalar "
                     f"codebooks and no pinned zero; got shape {w.shape}.")
  rows, channels = w.shape
  if jnp.shape(hessian) != (rows, rows):
    raise ValueError(f"the Hessian is {jnp.shape(hessian)}; a weight of {rows} input rows needs "
                     f"({rows}, {rows}).")
  book = jnp.asarray(clustered.codebook, jnp.float32)
  book = book[None] if book.ndim == 2 else book  # (R, C or 1, k)
  per_group = rows // book.shape[0]
  upper = _upper_inverse_cholesky(hessian, damping)

  def row_step(i, carry):
    w, indices = carry
    row = w[i]
    table = jnp.broadcast_to(book[i // per_group], (channels, book.shape[-1]))
    index = jnp.argmin(jnp.abs(row[:, None] - table), axis=-1)
    chosen = jnp.take_along_axis(table, index[:, None], axis=-1)[:, 0]
    error = (row - chosen) / upper[i, i]
    # Rows after i absorb the error (upper[i, j] = 0 for j < i; row i itself becomes chosen).
    w = w - upper[i][:, None] * error[None, :]
    return w, indices.at[i].set(index.astype(indices.dtype))

  _, indices = jax.lax.fori_loop(0, rows, row_step,
                                 (w, jnp.zeros((rows, channels), clustered.indices.dtype)))
  return clustered.replace(indices=indices)


def refit_codebooks(weight, clustered: ClusteredArray, hessian, *,
                    ridge: float = 1e-6) -> ClusteredArray:
  """``clustered`` with every codebook entry set to minimise the output error given the
  indices: per channel c, b_c = argmin (w_c - S_c b)^T H (w_c - S_c b), S_c the one-hot
  indices, a (k, k) solve per channel (per-layer codebooks: one solve over all channels).
  GPTVQ's codebook update; never raises the error for these indices. Entries no weight
  uses keep their value (the small ridge pulls them there).

  Args as :func:`error_feedback_indices`; codebooks (C, k) or (1, k).
  """
  w = jnp.asarray(weight, jnp.float32)
  book = jnp.asarray(clustered.codebook, jnp.float32)
  if w.ndim != 2 or book.ndim != 2 or clustered.vector_shape is not None:
    raise ValueError("refit_codebooks takes a 2-D weight with per-channel (C, k) or per-layer "
                     f"(1, k) codebooks; got weight {w.shape}, codebook {book.shape}.")
  h = jnp.asarray(hessian, jnp.float32)
  k = book.shape[-1]
  onehot = jax.nn.one_hot(clustered.indices, k, dtype=jnp.float32)  # (F, C, k)
  h_onehot = jnp.einsum("fg,gck->fck", h, onehot)
  gram = jnp.einsum("fck,fcj->ckj", onehot, h_onehot)  # (C, k, k)
  target = jnp.einsum("fck,fc->ck", h_onehot, w)
  if book.shape[0] == 1:
    gram, target = gram.sum(0, keepdims=True), target.sum(0, keepdims=True)
  lam = ridge * jnp.mean(jnp.diagonal(h)) * jnp.maximum(1.0, w.shape[0] / k)
  eye = jnp.eye(k, dtype=jnp.float32)
  new = jnp.linalg.solve(gram + lam * eye, (target + lam * book)[..., None])[..., 0]
  return clustered.replace(codebook=new.astype(clustered.codebook.dtype))
