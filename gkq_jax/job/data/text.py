"""An offline text corpus for small language models: the running Python's own standard library.

Every machine that runs the job has the interpreter's ``.py`` files, no one here wrote them, and
they are real text (code, comments, docstrings) that a byte-level model learns something from,
so a language-model run needs no download. The corpus is:

  * every ``.py`` file under ``sysconfig.get_paths()["stdlib"]``, minus site-/dist-packages,
    test folders (``test/``, ``tests/``, ``idlelib/idle_test``...), build-specific generated
    files (``_sysconfigdata_*``), empty files and files that are not valid UTF-8;
  * split BY FILE (no file is in two splits) into train / validation / test: a permutation of
    the sorted relative paths drawn by ``seed`` is cut by ``fractions``. The split is a small
    record (:meth:`Corpus.record`: files, seed, Python version, bytes and a digest per split)
    the job writes to JSON, so a run can be reproduced and another machine checked against it.

Tokenization: bytes by default (ids 0..255, EOS = 257 closes every file, BOS = 256 optional),
or byte-level BPE trained with ``tokenizers`` on the train split only (:func:`train_bpe`),
saved as a ``tokenizer.json`` that can sit in a Hugging Face checkpoint folder.

Batches: :func:`train_batches` shuffles windows per (seed, epoch); :func:`eval_windows` covers a
split exactly once. Convention (next-token prediction over the split's one token stream of N
tokens): every token but the first is a target exactly once, so the masks sum to N - 1; the
first token (the start of the first file) is context only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import platform
import sys
import sysconfig
from typing import Iterator, Sequence

import numpy as np

from gkq_jax.job.data.images import DataError

SPLITS = ("train", "validation", "test")
# Folders that are not the library's own prose: installed packages, tests (some hold files
# that are deliberately broken), byte-code and build configuration.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests",
                       "idle_test", "lib-dynload"})
EOS_TOKEN = "<|endoftext|>"


def stdlib_root() -> pathlib.Path:
  """The running interpreter's standard-library folder (the base one, also inside a venv)."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _skip_dir(name: str) -> bool:
  return name in SKIP_DIRS or name.startswith("config-")


def _skip_file(name: str) -> bool:
  # _sysconfigdata_* is generated per build (compiler flags): not the same on two machines.
  return not name.endswith(".py") or name.startswith("_sysconfigdata_")


def stdlib_files(root: pathlib.Path | None = None) -> list[str]:
  """Sorted POSIX paths, relative to ``root``, of the candidate ``.py`` files (not yet read:
  :func:`stdlib_corpus` drops the empty and non-UTF-8 ones)."""
  root = stdlib_root() if root is None else pathlib.Path(root)
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if not _skip_dir(d)]  # pruned: site-packages may be huge
    rel = pathlib.Path(folder).relative_to(root)
    found += [(rel / f).as_posix() for f in files if not _skip_file(f)]
  return sorted(found)


def read_utf8(path: pathlib.Path) -> bytes | None:
  """The file's bytes, or None when it is empty or not valid UTF-8."""
  data = path.read_bytes()
  try:
    data.decode("utf-8")
  except UnicodeDecodeError:
    return None
  return data or None


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
  fractions = tuple(float(f) for f in fractions)
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
    raise DataError(f"fractions={fractions} must be three non-negative numbers (train, "
                    "validation, test) that sum to 1, e.g. (0.9, 0.05, 0.05).")
  return fractions


def seeded_order(paths: Sequence[str], seed: int, salt: int) -> list[str]:
  """``paths`` sorted, then permuted by (seed, salt): the same list on every machine that has
  the same files, whatever order the file system lists them in."""
  paths = sorted(paths)
  return [paths[i] for i in np.random.default_rng([seed, salt]).permutation(len(paths))]


def cut(n: int, fractions: Sequence[float]) -> list[slice]:
  """Consecutive slices of ``range(n)`` with sizes rounded from the cumulative fractions."""
  ends = [int(round(n * c)) for c in np.cumsum(fractions)]
  ends[-1] = n
  return [slice(a, b) for a, b in zip([0] + ends[:-1], ends)]


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The standard library split by file; ``contents`` maps a relative path to its bytes."""

  root: str
  seed: int
  fractions: tuple[float, float, float]
  max_files: int | None
  files: dict[str, tuple[str, ...]]  # split -> sorted relative paths
  contents: dict[str, bytes] = dataclasses.field(repr=False)

  def texts(self, split: str) -> list[str]:
    return [self.contents[p].decode("utf-8") for p in self.files[_split_name(split)]]

  def num_bytes(self, split: str) -> int:
    """UTF-8 bytes of the split's text: the denominator of bits per byte."""
    return sum(len(self.contents[p]) for p in self.files[_split_name(split)])

  def digest(self, split: str) -> str:
    """sha256 over the split's paths and bytes: equal digests, equal text."""
    h = hashlib.sha256()
    for p in self.files[_split_name(split)]:
      h.update(p.encode() + b"\0" + self.contents[p] + b"\0")
    return h.hexdigest()

  def record(self) -> dict:
    """What the job writes to JSON to pin the data a run saw."""
    return {
        "source": "python-stdlib",
        "python_version": platform.python_version(),
        "python_implementation": sys.implementation.name,
        "root": self.root,
        "seed": self.seed,
        "fractions": list(self.fractions),
        "max_files": self.max_files,
        "splits": {s: {"num_files": len(self.files[s]), "num_bytes": self.num_bytes(s),
                       "sha256": self.digest(s), "files": list(self.files[s])}
                   for s in SPLITS},
    }


def _split_name(split: str) -> str:
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
  return split


def stdlib_corpus(seed: int = 0, fractions: Sequence[float] = (0.9, 0.05, 0.05),
                  max_files: int | None = None, root: pathlib.Path | None = None) -> Corpus:
  """The standard library split by file (see the module docstring). ``max_files`` keeps the
  first that many readable files of the seeded order (for quick runs and tests); only those
  are read. Raises DataError (a ValueError) when a split comes out empty."""
  fractions = _check_fractions(fractions)
  if max_files is not None and max_files < 1:
    raise DataError(f"max_files={max_files} must be >= 1 (or None for every file).")
  root = stdlib_root() if root is None else pathlib.Path(root)
  contents = {}
  for rel in seeded_order(stdlib_files(root), seed, salt=0x7E47):
    if max_files is not None and len(contents) >= max_files:
      break
    data = read_utf8(root / rel)
    if data is not None:
      contents[rel] = data
  order = list(contents)  # the seeded order, unreadable files left out
  files = {}
  for name, part in zip(SPLITS, cut(len(order), fractions)):
    files[name] = tuple(sorted(order[part]))
    if not files[name]:
      raise DataError(
          f"the {name} split of the standard-library corpus is empty ({len(order)} files under "
          f"{root}, fractions {fractions}, max_files={max_files}); raise its fraction or "
          "max_files (each split needs at least one file).")
  return Corpus(str(root), seed, fractions, max_files, files, contents)


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; BOS = 256 and EOS = 257 when used (the vocabulary is then 258,
  so that the two ids never move)."""

  BOS, EOS = 256, 257

  def __init__(self, bos: bool = False, eos: bool = True):
    self.bos_id = self.BOS if bos else None
    self.eos_id = self.EOS if eos else None

  @property
  def vocab_size(self) -> int:
    return 258 if self.bos_id is not None or self.eos_id is not None else 256

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class BpeTokenizer:
  """A byte-level BPE ``tokenizers.Tokenizer`` (every string round-trips) with the interface of
  :class:`ByteTokenizer`; ``EOS_TOKEN`` closes every file."""

  def __init__(self, tokenizer, bos_token: str | None = None, eos_token: str | None = EOS_TOKEN):
    self.tokenizer = tokenizer
    self.bos_id = self._id(bos_token)
    self.eos_id = self._id(eos_token)

  def _id(self, token: str | None) -> int | None:
    if token is None:
      return None
    i = self.tokenizer.token_to_id(token)
    if i is None:
      raise DataError(f"the tokenizer has no special token {token!r}.")
    return i

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  def encode(self, text: str | bytes) -> np.ndarray:
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    return np.asarray(self.tokenizer.encode(text).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32) for e in self.tokenizer.encode_batch(list(texts))]

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids])

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes ``tokenizer.json`` (into ``path`` when it is a folder); returns the file."""
    path = pathlib.Path(path)
    path = path / "tokenizer.json" if path.is_dir() else path
    self.tokenizer.save(str(path))
    return path

  @classmethod
  def load(cls, path: str | os.PathLike, **kwargs) -> "BpeTokenizer":
    from tokenizers import Tokenizer
    path = pathlib.Path(path)
    path = path / "tokenizer.json" if path.is_dir() else path
    return cls(Tokenizer.from_file(str(path)), **kwargs)


def train_bpe(corpus: Corpus, vocab_size: int, min_frequency: int = 2) -> BpeTokenizer:
  """Byte-level BPE with ``vocab_size`` ids (``EOS_TOKEN`` is id 0), trained on the train split
  only, so validation and test text never shapes the vocabulary."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + 1:
    raise DataError(f"BPE vocab_size={vocab_size} must be at least {len(alphabet) + 1} "
                    "(256 bytes and the end-of-text token).")
  tok = Tokenizer(models.BPE())
  # No prefix space: decode(encode(text)) is then the text itself.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=[EOS_TOKEN], initial_alphabet=alphabet,
                                show_progress=False)
  texts = corpus.texts("train")
  tok.train_from_iterator(texts, trainer, length=len(texts))
  return BpeTokenizer(tok)


def encode_split(corpus: Corpus, split: str, tokenizer=None) -> np.ndarray:
  """The split as one int32 token stream: per file (in sorted order) [BOS] ids [EOS], with the
  special tokens the tokenizer has (default: bytes, EOS closing each file)."""
  tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
  texts = [corpus.contents[p] for p in corpus.files[_split_name(split)]]
  if isinstance(tokenizer, BpeTokenizer):
    pieces = tokenizer.encode_batch([t.decode("utf-8") for t in texts])
  else:
    pieces = [tokenizer.encode(t) for t in texts]
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
  parts = []
  for ids in pieces:
    parts += [np.asarray(bos, np.int32), ids, np.asarray(eos, np.int32)]
  return np.concatenate(parts).astype(np.int32)


def _check_window(tokens: np.ndarray, seq_len: int, batch_size: int):
  if seq_len < 1 or batch_size < 1:
    raise DataError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1.")
  if len(tokens) < 2:
    raise DataError(f"a token stream of {len(tokens)} tokens has no next token to predict.")


def train_batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, epoch: int,
                  start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of (inputs, targets), each (batch_size, seq_len) int32, targets the inputs
  shifted by one token, from batch ``start`` on. Windows tile the stream from an offset drawn
  per epoch (so a token does not sit at the same position every epoch) and are shuffled; all
  depends only on (seed, epoch). The last partial batch is dropped."""
  _check_window(tokens, seq_len, batch_size)
  rng = np.random.default_rng([seed, epoch, 0x7E47])
  offset = int(rng.integers(max(1, min(seq_len, len(tokens) - seq_len))))
  n = (len(tokens) - 1 - offset) // seq_len
  if n < batch_size:
    raise DataError(f"{len(tokens)} tokens make {n} windows of {seq_len + 1}, fewer than "
                    f"batch_size={batch_size}; lower batch_size or seq_len, or use more text.")
  starts = offset + seq_len * rng.permutation(n)
  span = np.arange(seq_len + 1)
  for first in range(start * batch_size, n - batch_size + 1, batch_size):
    window = np.asarray(tokens[starts[first:first + batch_size, None] + span], np.int32)
    yield window[:, :-1], window[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(inputs, targets, mask) batches, (batch_size, seq_len) each, mask float32 0/1, whose
  targets cover ``tokens[1:]`` exactly once (see the module docstring): window j predicts
  tokens j*seq_len+1 .. (j+1)*seq_len from the ones before it in the window, and padding (the
  end of the last window, whole windows of the last batch) has mask 0."""
  _check_window(tokens, seq_len, batch_size)
  n_targets = len(tokens) - 1
  per_batch = seq_len * batch_size
  for first in range(0, n_targets, per_batch):
    count = min(per_batch, n_targets - first)
    inputs = np.zeros(per_batch, np.int32)
    targets = np.zeros(per_batch, np.int32)
    mask = np.zeros(per_batch, np.float32)
    inputs[:count] = tokens[first:first + count]
    targets[:count] = tokens[first + 1:first + 1 + count]
    mask[:count] = 1
    shape = (batch_size, seq_len)
    yield inputs.reshape(shape), targets.reshape(shape), mask.reshape(shape)
