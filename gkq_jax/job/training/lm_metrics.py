"""The measures users judge a compressed pretrained transformer by, for every method alike.

  * Language models: perplexity and bits per byte over a WHOLE split, streamed window by window
    (:func:`perplexity`; the windows come from :func:`gkq_jax.job.data.text.eval_windows`).
    Per-token losses are summed on the host in float64, so the figure does not depend on the
    batch size and a uniform model over V ids scores V (:func:`uniform_perplexity`).
  * Sentence embeddings: how close the compressed model's embeddings stay to the reference
    model's (:func:`mean_cosine`, :func:`topk_overlap`) and whether it still finds the right
    document (:func:`retrieval_scores`).
  * Throughput: :func:`tokens_per_second`, wall clock after warm-up.

No model code here: a model is a callable (``logits_fn(inputs) -> (B, L, V) logits``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LmScores:
  """Mean negative log-likelihood per scored token (nats), its exp, bits per byte of text."""

  nll: float
  perplexity: float
  bits_per_byte: float | None  # None when the number of bytes was not given
  tokens: int  # scored (unmasked) tokens
  bytes: int | None

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


@jax.jit
def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  # float32 whatever the model's dtype: a bfloat16 log-softmax loses the small differences
  # between a model and its compressed copy.
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - picked


def perplexity(logits_fn: Callable[[Any], Any],
               windows: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
               num_bytes: int | None = None) -> LmScores:
  """Scores ``logits_fn`` on every (inputs, targets, mask) window; masked tokens (padding) do
  not count. Bits per byte = total NLL in bits / ``num_bytes``, the UTF-8 bytes of the text
  the windows hold (for bytes without special tokens that is the number of scored tokens; for
  BPE the split's byte length: :meth:`gkq_jax.job.data.text.Corpus.num_bytes`)."""
  total, count = 0.0, 0
  for inputs, targets, mask in windows:
    nll = np.asarray(_token_nll(logits_fn(inputs), jnp.asarray(targets)), np.float64)
    mask = np.asarray(mask, np.float64)
    # where(): a padded position's loss may be inf or nan (an id the model never saw).
    total += float(np.sum(np.where(mask > 0, nll, 0.0) * mask))
    count += int(np.count_nonzero(mask))
  if count == 0:
    raise ValueError("perplexity: the windows hold no scored token (every mask is 0).")
  mean = total / count
  bpb = total / math.log(2) / num_bytes if num_bytes else None
  return LmScores(mean, math.exp(mean), bpb, count, num_bytes)


def uniform_logits(vocab_size: int) -> Callable[[Any], jax.Array]:
  """A model that gives every id the same logit: its perplexity is exactly ``vocab_size``."""
  return lambda inputs: jnp.zeros(np.shape(inputs) + (vocab_size,), jnp.float32)


def uniform_perplexity(windows, vocab_size: int, num_bytes: int | None = None,
                       rtol: float = 1e-6) -> LmScores:
  """The measure checked on real windows: a uniform model must score ``vocab_size``
  (AssertionError otherwise), e.g. the baseline row of a perplexity table."""
  scores = perplexity(uniform_logits(vocab_size), windows, num_bytes)
  if abs(scores.perplexity / vocab_size - 1) > rtol:
    raise AssertionError(f"a uniform model over {vocab_size} ids scored perplexity "
                         f"{scores.perplexity}, not {vocab_size}: the measure is broken.")
  return scores


def _unit_rows(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"embeddings must be (n, d), got shape {x.shape}.")
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _same_shape(a: np.ndarray, b: np.ndarray):
  if a.shape != b.shape:
    raise ValueError(f"embedding matrices differ in shape: {a.shape} vs {b.shape}.")


def mean_cosine(a, b) -> float:
  """Mean over rows of the cosine between row i of ``a`` and row i of ``b``."""
  a, b = _unit_rows(a), _unit_rows(b)
  _same_shape(a, b)
  return float(np.mean(np.sum(a * b, axis=1)))


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
  """(n, k) indices of each row's k nearest other rows by cosine (itself left out)."""
  sim = x @ x.T
  np.fill_diagonal(sim, -np.inf)
  return np.argpartition(-sim, k - 1, axis=1)[:, :k]


def topk_overlap(reference, other, k: int = 10) -> float:
  """Mean over rows of |kNN under ``reference`` & kNN under ``other``| / k, neighbours by
  cosine excluding the row itself: 1.0 when the compressed model keeps every neighbourhood."""
  reference, other = _unit_rows(reference), _unit_rows(other)
  _same_shape(reference, other)
  if not 1 <= k < len(reference):
    raise ValueError(f"k={k} must be between 1 and n - 1 = {len(reference) - 1}.")
  ref, oth = _neighbours(reference, k), _neighbours(other, k)
  shared = [len(np.intersect1d(r, o)) for r, o in zip(ref, oth)]
  return float(np.mean(shared) / k)


def retrieval_scores(query_emb, doc_emb) -> dict[str, float]:
  """Query i's correct document is document i; documents ranked by cosine. Returns top-1
  accuracy and MRR (mean of 1 / rank). A document tied with the correct one counts as ranked
  above it, so a collapsed model (every embedding equal) scores low, not perfect."""
  q, d = _unit_rows(query_emb), _unit_rows(doc_emb)
  _same_shape(q, d)
  sim = q @ d.T
  correct = np.diag(sim)[:, None]
  rank = np.sum(sim >= correct, axis=1)  # 1 when the correct document is strictly first
  return {"top1": float(np.mean(rank == 1)), "mrr": float(np.mean(1.0 / rank)),
          "n": int(len(q))}


@dataclasses.dataclass(frozen=True)
class Throughput:
  tokens_per_second: float  # median over the timed calls
  seconds: list[float]  # each timed call
  tokens_per_call: int


def tokens_per_second(fn: Callable[[Any], Any], inputs: Any, tokens_per_call: int,
                      repeats: int = 10, warmup: int = 2) -> Throughput:
  """Times ``fn(inputs)`` ``repeats`` times after ``warmup`` untimed calls (compilation,
  caches), each until its outputs are ready (``jax.block_until_ready``)."""
  if repeats < 1 or warmup < 0 or tokens_per_call < 1:
    raise ValueError(f"repeats={repeats} must be >= 1, warmup={warmup} >= 0 and "
                     f"tokens_per_call={tokens_per_call} >= 1.")
  for _ in range(warmup):
    jax.block_until_ready(fn(inputs))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(inputs))
    seconds.append(time.perf_counter() - start)
  rates = [tokens_per_call / max(s, 1e-12) for s in seconds]
  return Throughput(float(statistics.median(rates)), seconds, tokens_per_call)
