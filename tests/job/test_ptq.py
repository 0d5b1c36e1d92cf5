"""The ptq mode (gkq_jax/job/modes/ptq.py) on a tiny Llama trained here and a tiny BERT, offline.

The tiny Llama (configs/llama.py:smoke, trained longer) is compressed at 2 bits (at 3 its
32-row channels lose almost nothing) by RTN, plain k-means and gkq with the Fisher: the table
must order them as the issue's full-size target does (gkq Fisher < k-means < RTN in
validation perplexity); with the importance ignored gkq equals k-means and the test
fails. Lossless and tied-embedding checks, and bad input.
"""

import numpy as np
import pytest
from flax import nnx

import gkq_jax as gkq
from configs import llama as llama_config
from configs import minilm as minilm_config
from gkq_jax.job import run as run_lib
from gkq_jax.job.models import bert, hf
from gkq_jax.job.modes import lm as lm_mode
from gkq_jax.job.modes import ptq


def _ptq(checkpoint, **overrides):
  config = llama_config.get_config("ptq_smoke")
  config.checkpoint = str(checkpoint)
  config.ptq.update(overrides)
  return config


@pytest.fixture(scope="module")
def trained_lm(tmp_path_factory):
  """The smoke Llama trained for 300 steps: its Hugging Face folder."""
  workdir = tmp_path_factory.mktemp("lm")
  config = llama_config.get_config("smoke")
  config.lm.update(dict(steps=300, warmup_steps=20))
  config.checkpoint_every = 0
  run_lib.run(config, workdir, command="test")
  return workdir / "checkpoint"


@pytest.fixture(scope="module")
def table(trained_lm, tmp_path_factory):
  config = _ptq(trained_lm, methods=("rtn", "kmeans", "gkq_fisher", "gkq_act", "gkq_act_ef",
                                             "qwix_int8"), bits=(2,),
                packed_method="gkq_act_ef", packed_bits=2,
                eval_tokens=4096, calibration_batches=4, calibration_batch_size=4)
  return run_lib.run(config, tmp_path_factory.mktemp("ptq"), command="test")


def _row(results, method):
  [row] = [r for r in results["rows"] if r["method"] == method]
  return row


def test_fisher_weighted_codebooks_beat_kmeans_which_beats_rtn(table):
  loss = {m: _row(table, m)["validation_perplexity"]
          for m in ("rtn", "kmeans", "gkq_fisher", "gkq_act", "gkq_act_ef")}
  assert loss["gkq_fisher"] < loss["kmeans"] < loss["rtn"], loss
  # Error feedback across input rows (the design that met the full-size target).
  assert loss["gkq_act_ef"] < loss["gkq_fisher"], loss
  assert table["fp32"]["validation_perplexity"] < loss["gkq_fisher"]
  # int8 is close to fp32; bits count the scales (4 + 32 / rows for every channel).
  qwix = _row(table, "qwix_int8")
  assert qwix["validation_perplexity"] < 1.01 * table["fp32"]["validation_perplexity"]
  assert 8 < qwix["bits_per_weight"] < 10
  for method in ("rtn", "kmeans", "gkq_fisher"):
    assert 1 < _row(table, method)["bits_per_weight"] < 32
  assert [c for c in table["table"]["columns"][:2]] == ["method", "bits"]
  # The packed runtime runs the compressed LM as its dense weights do.
  assert table["packed"]["max_abs_difference"] < 1e-4
  assert table["packed"]["packed_tokens_per_second"] > 0


def test_codebooks_with_room_for_every_value_give_fp32_logits(trained_lm):
  loaded = hf.load_checkpoint(trained_lm)
  model = loaded.model
  params = nnx.state(model, nnx.Param)
  # Every kernel rounded to 4 values per output channel: a 2-bit codebook holds them exactly.
  rounded = jax_round_channels(params, 4)
  nnx.update(model, rounded)
  q = gkq.quantize(nnx.state(model, nnx.Param), None, [gkq.bits_rule("kernel$", 2)],
                   granularity="channel")
  copy = nnx.clone(model)
  nnx.update(copy, gkq.dequantize(q))
  tokens = np.arange(64, dtype=np.int32).reshape(2, 32) % 200
  np.testing.assert_array_equal(np.asarray(copy(tokens)), np.asarray(model(tokens)))


def jax_round_channels(params, levels: int):
  """Each kernel's channels snapped to ``levels`` values of their own range."""
  def snap(path, v):
    if not path[-1] == "kernel":
      return v
    a = np.asarray(v)
    lo, hi = a.min(0, keepdims=True), a.max(0, keepdims=True)
    step = (hi - lo) / (levels - 1)
    return np.asarray(lo + np.round((a - lo) / step) * step, a.dtype)
  flat = {p: snap(p, v.get_value()) for p, v in nnx.to_flat_state(params)}
  return nnx.State.from_flat_path(flat)


def test_tied_embedding_is_compressed_once_and_stays_one_array(trained_lm):
  loaded = hf.load_checkpoint(trained_lm)
  config = _ptq(trained_lm, embeddings=True)
  rules = ptq.rules_for(config.ptq, 2)
  params = nnx.state(loaded.model, nnx.Param)
  paths = [p for p, _ in ptq.selected(params, rules)]
  assert "embed_tokens/embedding" in paths and not any("lm_head" in p for p in paths)
  done = ptq.compress(ptq.Subject(loaded.model, None, None, None, None, "__call__", ""),
                      "kmeans", 2, rules, {}, config.ptq)
  embedding = np.asarray(done.model.embed_tokens.embedding.get_value())
  assert max(len(np.unique(embedding[:, c])) for c in range(embedding.shape[1])) <= 4
  # The output layer reads the same (compressed) array: logits = h @ E^T.
  assert done.model.lm_head is None
  h = np.ones((1, 1, embedding.shape[1]), np.float32)
  np.testing.assert_allclose(np.asarray(done.model.embed_tokens.attend(h))[0, 0],
                             embedding.sum(1), rtol=1e-5, atol=1e-6)


def test_bad_ptq_settings_are_named_before_anything_runs(trained_lm, tmp_path):
  for overrides, match in (({"sparse_fraction": 1.0}, r"sparse_fraction=1.0 must be in \[0, 1\)"),
                           ({"bits": (12,)}, "packed runtime runs 1..8-bit"),
                           ({"methods": ("gptq",)}, "ptq.methods has"),
                           ({"group_size": 0}, "group_size=0 must be >= 1")):
    with pytest.raises(ValueError, match=match):
      run_lib.run(_ptq(trained_lm, **overrides), tmp_path / "w")
  assert not (tmp_path / "w").exists()
  wrong = minilm_config.get_config("ptq")
  wrong.checkpoint = str(trained_lm)
  with pytest.raises(ValueError, match="holds a 'llama' model; the ptq mode needs a BERT"):
    run_lib.run(wrong, tmp_path / "w")


def test_tiny_bert_table_runs(tmp_path):
  config = bert.BertConfig(vocab_size=258, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=128)
  model = bert.create(config, seed=3, pooling=bert.Pooling("mean", True, 96))
  folder = hf.save_checkpoint(model, config, tmp_path / "bert",
                              tokenizer=lm_mode.byte_level_tokenizer())
  c = minilm_config.get_config("ptq")
  c.checkpoint = str(folder)
  c.embeddings.update(dict(calibration_size=16, evaluation_size=48, max_files=60, batch_size=16))
  c.ptq.update(dict(methods=("rtn", "gkq_fisher"), bits=(4,), calibration_batches=2,
                    calibration_batch_size=8, calibration_length=32))
  results = run_lib.run(c, tmp_path / "w", command="test")
  assert results["fp32"]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
  for row in results["rows"]:
    assert 0.9 < row["mean_cosine"] <= 1.0 + 1e-6
