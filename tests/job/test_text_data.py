"""The standard-library text corpus and code-search pairs (gkq_jax.job.data.text, .retrieval)."""

import json
import platform

import numpy as np
import pytest

from gkq_jax.job.data import retrieval
from gkq_jax.job.data import text as text_lib


@pytest.fixture(scope="module")
def corpus():
  return text_lib.stdlib_corpus(seed=0, fractions=(0.8, 0.1, 0.1), max_files=40)


def test_splits_are_disjoint_cover_the_files_and_follow_the_seed(corpus):
  files = [set(corpus.files[s]) for s in text_lib.SPLITS]
  assert all(files) and not files[0] & files[1] and not files[0] & files[2]
  assert not files[1] & files[2]
  assert set().union(*files) == set(corpus.contents) and len(corpus.contents) == 40
  assert [len(f) for f in files] == [32, 4, 4]
  every = set(text_lib.stdlib_files())
  assert set(corpus.contents) <= every
  assert not any(part in ("test", "tests", "idle_test", "site-packages")
                 for p in every for part in p.split("/")[:-1])
  again = text_lib.stdlib_corpus(seed=0, fractions=(0.8, 0.1, 0.1), max_files=40)
  other = text_lib.stdlib_corpus(seed=1, fractions=(0.8, 0.1, 0.1), max_files=40)
  assert again.files == corpus.files and other.files != corpus.files


def test_split_record_is_json_with_the_python_version(corpus):
  record = json.loads(json.dumps(corpus.record()))
  assert record["python_version"] == platform.python_version() and record["seed"] == 0
  for s in text_lib.SPLITS:
    assert record["splits"][s]["files"] == list(corpus.files[s])
    assert record["splits"][s]["num_bytes"] == sum(len(corpus.contents[p])
                                                   for p in corpus.files[s])


@pytest.mark.parametrize("kwargs,match", [
    (dict(fractions=(0.98, 0.01, 0.01), max_files=20), "validation split .* is empty"),
    (dict(fractions=(0.9, 0.1, 0.0), max_files=20), "test split .* is empty"),
    (dict(fractions=(0.5, 0.2, 0.2)), "sum to 1"),
])
def test_empty_or_bad_splits_say_how_to_fix(kwargs, match):
  with pytest.raises(ValueError, match=match):
    text_lib.stdlib_corpus(seed=0, **kwargs)


def test_byte_stream_closes_every_file_with_eos(corpus):
  tokens = text_lib.encode_split(corpus, "validation")
  tok = text_lib.ByteTokenizer()
  assert tokens.dtype == np.int32 and tok.vocab_size == 258
  assert np.sum(tokens == tok.EOS) == len(corpus.files["validation"])
  assert len(tokens) == corpus.num_bytes("validation") + len(corpus.files["validation"])
  assert tok.decode(tokens) == "".join(corpus.texts("validation"))


def test_train_batches_shift_by_one_and_are_deterministic():
  tokens = np.arange(1000, dtype=np.int32)  # a token's value is its position
  a = list(text_lib.train_batches(tokens, 4, 16, seed=3, epoch=1))
  b = list(text_lib.train_batches(tokens, 4, 16, seed=3, epoch=1))
  c = list(text_lib.train_batches(tokens, 4, 16, seed=3, epoch=2))
  x, y = a[0]
  assert x.shape == y.shape == (4, 16) and x.dtype == np.int32
  np.testing.assert_array_equal(y, x + 1)
  np.testing.assert_array_equal(np.diff(x, axis=1), 1)  # contiguous windows
  assert all(np.array_equal(p[0], q[0]) for p, q in zip(a, b))
  assert not np.array_equal(a[0][0], c[0][0])
  assert len(a) >= (1000 - 16) // 16 // 4
  starts = np.concatenate([x[:, 0] for x, _ in a])
  assert len(set(starts)) == len(starts)  # no window twice in an epoch
  resumed = list(text_lib.train_batches(tokens, 4, 16, seed=3, epoch=1, start=2))
  np.testing.assert_array_equal(resumed[0][0], a[2][0])


@pytest.mark.parametrize("n", [2, 17, 64, 65, 100])
def test_eval_windows_score_every_next_token_once(n):
  tokens = np.arange(n, dtype=np.int32)
  batches = list(text_lib.eval_windows(tokens, seq_len=8, batch_size=4))
  scored = np.concatenate([y[m > 0] for _, y, m in batches])
  np.testing.assert_array_equal(scored, np.arange(1, n))  # tokens[1:], each exactly once
  assert sum(m.sum() for _, _, m in batches) == n - 1
  for x, y, m in batches:
    assert x.shape == y.shape == m.shape == (4, 8)
    np.testing.assert_array_equal(y[m > 0], x[m > 0] + 1)


def test_bpe_trained_on_train_split_round_trips(corpus, tmp_path):
  tok = text_lib.train_bpe(corpus, vocab_size=400)
  assert tok.vocab_size == 400 and tok.eos_id == 0
  sample = corpus.texts("test")[0][:2000] + "\n\tnon-ASCII: h\u00e9llo \u2013 \u4e2d\u6587  \r\n"
  assert tok.decode(tok.encode(sample)) == sample
  path = tok.save(tmp_path)
  assert path.name == "tokenizer.json"
  loaded = text_lib.BpeTokenizer.load(tmp_path)
  np.testing.assert_array_equal(loaded.encode(sample), tok.encode(sample))
  tokens = text_lib.encode_split(corpus, "validation", tok)
  assert np.sum(tokens == tok.eos_id) == len(corpus.files["validation"])
  assert len(tokens) < corpus.num_bytes("validation")  # BPE compresses


def test_retrieval_pairs_disjoint_by_file_and_deterministic():
  task = retrieval.code_search_task(seed=0, calibration_size=30, evaluation_size=40,
                                    max_files=40)
  again = retrieval.code_search_task(seed=0, calibration_size=30, evaluation_size=40,
                                     max_files=40)
  assert task == again
  assert len(task.calibration) == 30 and len(task.evaluation) == 40
  assert not {p.path for p in task.calibration} & {p.path for p in task.evaluation}
  everything = task.calibration + task.evaluation
  assert len({p.query for p in everything}) == len({p.document for p in everything}) == 70
  for p in everything:
    assert len(p.query.split()) >= 4 and len(p.query) <= 256
    assert p.document.startswith(("def ", "async def ")) and p.document.endswith(":")
  json.dumps(task.record())
  with pytest.raises(ValueError, match="lower the sizes or raise max_files"):
    retrieval.code_search_task(seed=0, calibration_size=30, evaluation_size=10_000,
                               max_files=40)


def test_pair_extraction_on_known_source():
  source = ('def urljoin(base, url, allow_fragments=True):\n'
            '  """Join a base URL and a possibly relative URL\n  to form an absolute one.\n\n'
            '  More text."""\n'
            'class A:\n'
            '  async def f(self, *a, k: int = 1) -> str:\n    """Return self."""\n')
  pairs = retrieval.file_pairs(source, "x.py")
  assert [(p.query, p.document) for p in pairs] == [
      ("Join a base URL and a possibly relative URL to form an absolute one.",
       "def urljoin(base, url, allow_fragments=True):")]
  assert retrieval.file_pairs(source, "x.py", min_words=2)[1].document == (
      "async def f(self, *a, k: int=1) -> str:")
  assert retrieval.first_paragraph("word " * 100, max_chars=22) == "word word word word"
