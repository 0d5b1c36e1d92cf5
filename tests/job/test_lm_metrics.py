"""The language-model and embedding measures (gkq_jax.job.training.lm_metrics)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from gkq_jax.job.data import text as text_lib
from gkq_jax.job.training import lm_metrics


@pytest.mark.parametrize("vocab", [256, 258, 50_257])
def test_uniform_model_scores_its_vocabulary_size(vocab):
  tokens = np.random.default_rng(0).integers(0, 256, 301).astype(np.int32)
  windows = text_lib.eval_windows(tokens, seq_len=16, batch_size=4)
  scores = lm_metrics.uniform_perplexity(windows, vocab, num_bytes=300)
  assert abs(scores.perplexity / vocab - 1) < 1e-6 and scores.tokens == 300
  assert scores.bits_per_byte == pytest.approx(math.log2(vocab), rel=1e-6)
  if vocab == 256:
    assert scores.bits_per_byte == pytest.approx(8.0, rel=1e-6)


def test_padding_does_not_count_and_batching_does_not_matter():
  tokens = np.random.default_rng(1).integers(0, 8, 50).astype(np.int32)

  def bigram(inputs):  # a fixed model: the logit of id j after id i is (i * j) % 5
    inputs = jnp.asarray(inputs)
    return ((inputs[..., None] * jnp.arange(8)) % 5).astype(jnp.float32)

  a = lm_metrics.perplexity(bigram, text_lib.eval_windows(tokens, 7, 3), num_bytes=49)
  b = lm_metrics.perplexity(bigram, text_lib.eval_windows(tokens, 49, 1), num_bytes=49)
  # By hand: the negative log-softmax of each next token, over all 49 of them.
  logits = ((tokens[:-1, None] * np.arange(8)) % 5).astype(np.float64)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  nll = -logp[np.arange(49), tokens[1:]].mean()
  assert a.tokens == b.tokens == 49
  assert a.nll == pytest.approx(nll, rel=1e-6) and b.nll == pytest.approx(nll, rel=1e-6)
  assert a.bits_per_byte == pytest.approx(nll / math.log(2), rel=1e-6)
  assert a.perplexity == pytest.approx(math.exp(nll), rel=1e-6)


def test_all_masked_windows_are_an_error():
  x = np.zeros((1, 4), np.int32)
  with pytest.raises(ValueError, match="no scored token"):
    lm_metrics.perplexity(lm_metrics.uniform_logits(4), [(x, x, np.zeros((1, 4)))])


def test_identical_embeddings_score_perfectly():
  e = np.random.default_rng(0).standard_normal((40, 16))
  assert lm_metrics.mean_cosine(e, e) == pytest.approx(1.0)
  assert lm_metrics.mean_cosine(e, 3 * e) == pytest.approx(1.0)  # cosine ignores scale
  assert lm_metrics.mean_cosine(e, -e) == pytest.approx(-1.0)
  assert lm_metrics.topk_overlap(e, e, k=5) == 1.0
  assert lm_metrics.retrieval_scores(e, e) == {"top1": 1.0, "mrr": 1.0, "n": 40}


def test_topk_overlap_of_unrelated_neighbourhoods():
  # Points on an arc, unevenly spaced (no ties among neighbours): a rotation keeps every
  # cosine, a shuffle of the rows loses most neighbourhoods.
  angles = np.sort(np.random.default_rng(1).uniform(0, 1.2, 30))
  e = np.stack([np.cos(angles), np.sin(angles)], 1)
  rotation = np.array([[np.cos(2.0), -np.sin(2.0)], [np.sin(2.0), np.cos(2.0)]])
  assert lm_metrics.topk_overlap(e, e @ rotation, k=3) == 1.0
  shuffled = e[np.random.default_rng(0).permutation(30)]
  assert lm_metrics.topk_overlap(e, shuffled, k=3) < 0.5
  with pytest.raises(ValueError, match="k=30"):
    lm_metrics.topk_overlap(e, e, k=30)


@pytest.mark.parametrize("shift", [0, 1, 3])
def test_known_permutation_gives_known_mrr(shift):
  # Query i scores document j with v[(j - i) % n] (a cyclic Latin square: every document's
  # scores are a permutation of v, so all documents have the same norm and cosine keeps the
  # order). Documents permuted so that query i's correct one is old document (i + shift) % n
  # rank it shift + 1 for every query.
  n = 5
  v = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
  scores = np.array([[v[(j - i) % n] for j in range(n)] for i in range(n)])
  queries = np.eye(n)
  docs = scores.T[(np.arange(n) + shift) % n]
  out = lm_metrics.retrieval_scores(queries, docs)
  assert out["mrr"] == pytest.approx(1 / (shift + 1))
  assert out["top1"] == (1.0 if shift == 0 else 0.0)


def test_collapsed_embeddings_do_not_score_perfectly():
  same = np.ones((10, 4))
  out = lm_metrics.retrieval_scores(same, same)
  assert out["top1"] == 0.0 and out["mrr"] == pytest.approx(0.1)


def test_tokens_per_second_times_after_warmup():
  calls = []
  fn = lambda x: calls.append(1) or jnp.asarray(x) * 2
  out = lm_metrics.tokens_per_second(fn, np.ones((2, 8)), tokens_per_call=16, repeats=3,
                                     warmup=2)
  assert len(calls) == 5 and len(out.seconds) == 3 and out.tokens_per_call == 16
  assert out.tokens_per_second > 0
  with pytest.raises(ValueError, match="repeats"):
    lm_metrics.tokens_per_second(fn, np.ones(2), 16, repeats=0)
