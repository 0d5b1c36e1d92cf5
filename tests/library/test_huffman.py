"""Canonical Huffman coding (gkq_jax.huffman): the code-length limit."""

import numpy as np

from gkq_jax import huffman


def test_code_lengths_are_capped_and_the_stream_still_decodes(monkeypatch):
  # Fibonacci frequencies make the deepest Huffman tree: 25 symbols would need a
  # 24-bit code, past the 16 bits a one-lookup decode table allows.
  freqs = [1, 1]
  while len(freqs) < 25:
    freqs.append(freqs[-1] + freqs[-2])
  freqs = np.asarray(freqs)
  with monkeypatch.context() as m:
    m.setattr(huffman, "MAX_CODE_BITS", 64)
    assert huffman.code_lengths(freqs).max() == 24  # the data does need the cap
  lengths = huffman.code_lengths(freqs)
  assert lengths.max() <= huffman.MAX_CODE_BITS == 16
  assert (2.0 ** -lengths.astype(np.float64)).sum() <= 1.0  # Kraft: still a prefix code
  symbols = np.random.default_rng(0).permutation(np.repeat(np.arange(25), freqs))
  stream = huffman.encode(symbols, 25)
  np.testing.assert_array_equal(huffman.decode(stream["lengths"], stream["sync"], stream["data"],
                                               stream["count"]), symbols)
