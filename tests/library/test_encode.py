"""The compressed file (gkq_jax.encode): round trips and damaged files."""

import jax
import numpy as np
import pytest

import gkq_jax as gkq
from gkq_jax import encode


@pytest.mark.parametrize("case", ["truncated", "flipped", "newer", "not_ours"])
def test_damaged_files_raise_clear_errors(tmp_path, case):
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (40, 30)), "b": np.zeros(3)}
  q = gkq.quantize(params, None, [gkq.ClusterRule("w", 8)])
  path = tmp_path / "m.gkq"
  encode.save(path, q)
  data = bytearray(path.read_bytes())
  if case == "truncated":
    data = data[:-100]
    match = "truncated or corrupted"
  elif case == "flipped":
    data[len(data) // 2] ^= 0x10
    match = "truncated or corrupted"
  elif case == "newer":
    data[len(encode.MAGIC)] = encode.FORMAT_VERSION + 1
    match = "format version"
  else:
    data = b"PK\x03\x04" + data[4:]
    match = "not a gkq_jax compressed file"
  path.write_bytes(bytes(data))
  with pytest.raises(encode.CorruptFileError, match=match):
    encode.load(path)


@pytest.mark.parametrize("k,density", [(2, 1.0), (16, 1.0), (256, 1.0), (32, 0.05), (4, 0.3)])
def test_every_coding_round_trips_exactly(tmp_path, k, density):
  rng = np.random.default_rng(k)
  w = rng.standard_normal((123, 77)).astype(np.float32)
  w[rng.random(w.shape) > density] = 0
  mask = w != 0
  q = gkq.quantize({"w": w}, None, [gkq.ClusterRule("w", k)],
                   masks={"w": mask} if density < 1 else None)
  size, sizes = encode.save(tmp_path / "m.gkq", q)
  back = encode.load(tmp_path / "m.gkq")
  np.testing.assert_array_equal(np.asarray(gkq.dequantize(back)["w"]),
                                np.asarray(gkq.dequantize(q)["w"]))
  if density < 0.1:
    assert sizes["w"]["coding"] == "sparse"
