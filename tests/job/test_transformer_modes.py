"""The transformer modes of the job (gkq_jax.job.modes.lm, .embeddings) on tiny models, offline.

configs/llama.py:smoke trains a 27 k-parameter Llama on 12 standard-library files; its
Hugging Face checkpoint must hold exactly the trained weights and score the same when the
config is pointed at it; a killed run resumes to the same weights. configs/minilm.py:smoke
measures a tiny random BERT this module writes in Hugging Face layout. Bad input is a
one-line error raised before the workdir is touched.
"""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from configs import llama as llama_config
from configs import minilm as minilm_config
from gkq_jax.job import run as run_lib
from gkq_jax.job.data import retrieval
from gkq_jax.job.data import text as text_lib
from gkq_jax.job.models import bert, hf, llama
from gkq_jax.job.modes import embeddings as embeddings_mode
from gkq_jax.job.modes import lm as lm_mode
from gkq_jax.job.modes import transformer
from gkq_jax.job.training import lm_metrics
from gkq_jax.job.training import train as train_lib


def _llama(checkpoint="", **lm):
  config = llama_config.get_config("smoke")
  config.checkpoint = str(checkpoint)
  config.lm.update(lm)
  return config


def _minilm(checkpoint, **embeddings):
  config = minilm_config.get_config("smoke")
  config.checkpoint = str(checkpoint)
  config.embeddings.update(embeddings)
  return config


def _params(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
  """configs/llama.py:smoke run once: (workdir, results)."""
  workdir = tmp_path_factory.mktemp("llama")
  return workdir, run_lib.run(_llama(), workdir, command="test")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  """A random 2-layer BERT with sentence-transformers mean pooling + normalisation and the
  byte-level tokenizer, written in Hugging Face layout."""
  config = bert.BertConfig(vocab_size=258, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=128)
  model = bert.create(config, seed=3, pooling=bert.Pooling("mean", True, 96))
  folder = tmp_path_factory.mktemp("tiny_bert")
  return hf.save_checkpoint(model, config, folder, tokenizer=lm_mode.byte_level_tokenizer())


def test_llama_smoke_trains_saves_and_measures(llama_run):
  workdir, results = llama_run
  assert results["source"] == "trained here" and results["training"]["steps"] == 12
  for split in ("validation", "test"):
    scores = results["lm"][split]
    # Trained for 12 steps: far better than uniform over 258 ids, far from good.
    assert 2 < scores["perplexity"] < 258 and scores["tokens"] > 1000
    assert scores["bits_per_byte"] == pytest.approx(
        scores["nll"] * scores["tokens"] / math.log(2) / scores["bytes"])
  assert [r["batch"] for r in results["throughput"]] == [1, 4]
  assert all(r["tokens_per_second"] > 0 for r in results["throughput"])
  split = json.loads((workdir / "corpus_split.json").read_text())
  assert split["splits"]["validation"]["num_bytes"] == results["lm"]["validation"]["bytes"]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["columns"] == ["data", "measure", "value"] and summary["command"] == "test"
  assert ["validation", "perplexity", round(results["lm"]["validation"]["perplexity"], 4)] \
      in summary["rows"]
  assert summary["figures"]["parameters"] == results["parameters"] == 26_848
  assert json.loads((workdir / "results.json").read_text())["lm"] == results["lm"]


def test_saved_lm_checkpoint_holds_the_trained_weights_bit_for_bit(llama_run):
  workdir, results = llama_run
  config = _llama()
  loaded = hf.load_checkpoint(workdir / "checkpoint")
  assert sorted(p.name for p in (workdir / "checkpoint").iterdir()) == [
      "config.json", "model.safetensors", "tokenizer.json"]
  # The final training state, as orbax holds it, against the folder's tensors.
  cfg = lm_mode.model_config(config, 258)
  assert loaded.model.config == cfg
  graphdef, params, rest = nnx.split(llama.create(cfg), nnx.Param, ...)
  tx, _ = lm_mode.optimizer(config)
  leaves, treedef = jax.tree.flatten((params, tx.init(params)))
  step, leaves, _ = train_lib.restore_latest(workdir / "checkpoints" / "lm", leaves)
  assert step == 12
  trained = nnx.merge(graphdef, jax.tree.unflatten(treedef, list(leaves))[0], rest)
  want, got = _params(trained), _params(loaded.model)
  assert want.keys() == got.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
  tokens = np.random.default_rng(0).integers(0, 258, (2, 32)).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(transformer.jitted(loaded.model)(tokens)),
                                np.asarray(transformer.jitted(trained)(tokens)))
  # Its tokenizer.json is the byte tokenizer the model was trained with.
  text = "def f(x):\n  return 'héllo ✓'\r\n\x00"
  tok = lm_mode.checkpoint_tokenizer(loaded)
  assert list(tok.encode(text)) == list(text_lib.ByteTokenizer().encode(text))
  assert tok.eos_id == text_lib.ByteTokenizer.EOS and tok.decode(tok.encode(text)) == text


def test_config_pointed_at_the_saved_checkpoint_measures_it_alike(llama_run, tmp_path):
  workdir, results = llama_run
  again = run_lib.run(_llama(workdir / "checkpoint"), tmp_path)
  assert again["source"] == str((workdir / "checkpoint").resolve()) and again["training"] is None
  assert again["lm"] == results["lm"]  # the same tokens through the same weights
  assert not (tmp_path / "checkpoints").exists()


def test_killed_lm_run_resumes_to_the_same_result(llama_run, tmp_path, monkeypatch):
  workdir, straight = llama_run
  real = text_lib.train_batches
  drawn = []

  def dies_after_six(*args, **kwargs):
    for batch in real(*args, **kwargs):
      if len(drawn) == 6:
        raise KeyboardInterrupt("simulated kill")
      drawn.append(batch)
      yield batch

  monkeypatch.setattr(text_lib, "train_batches", dies_after_six)
  with pytest.raises(KeyboardInterrupt):
    run_lib.run(_llama(), tmp_path)
  assert not (tmp_path / "checkpoint").exists()
  drawn.clear()
  monkeypatch.setattr(text_lib, "train_batches", lambda *a, **k: (drawn.append(b) or b
                                                                  for b in real(*a, **k)))
  resumed = run_lib.run(_llama(), tmp_path)
  # checkpoint_every=4: the rerun starts from step 4 and trains the 8 steps left.
  assert resumed["training"]["resumed_from_step"] == 4 and len(drawn) == 8
  assert resumed["lm"] == straight["lm"]
  assert ((tmp_path / "checkpoint" / "model.safetensors").read_bytes()
          == (workdir / "checkpoint" / "model.safetensors").read_bytes())


def test_bpe_tokenizer_run_writes_its_tokenizer(tmp_path):
  results = run_lib.run(_llama(tokenizer="bpe", steps=2), tmp_path)
  loaded = hf.load_checkpoint(tmp_path / "checkpoint")
  assert results["vocab_size"] == loaded.model.config.vocab_size == 300
  assert loaded.tokenizer.to_str() == text_lib.BpeTokenizer.load(
      tmp_path / "bpe_tokenizer.json").tokenizer.to_str()
  assert all(1 < s["perplexity"] < 1000 for s in results["lm"].values())


def test_uniform_model_scores_the_vocabulary_size_through_measure_lm():
  corpus = text_lib.stdlib_corpus(0, (0.5, 0.25, 0.25), max_files=12)
  sets = lm_mode.lm_eval_sets(corpus, text_lib.ByteTokenizer())
  scores = lm_mode.measure_lm(lm_metrics.uniform_logits(258), sets, seq_len=32, batch_size=8)
  for split, (tokens, num_bytes) in sets.items():
    assert scores[split]["perplexity"] == pytest.approx(258, rel=1e-6)
    assert scores[split]["tokens"] == len(tokens) - 1
    assert scores[split]["bits_per_byte"] == pytest.approx(
        math.log2(258) * (len(tokens) - 1) / num_bytes, rel=1e-6)


def test_byte_level_tokenizer_is_the_byte_tokenizer():
  tok = lm_mode.byte_level_tokenizer()
  text = "".join(map(chr, range(1, 600))) + " \t\r\n  ünïcode ✓ 日本"
  assert tok.encode(text).ids == list(text.encode("utf-8"))
  assert tok.decode(tok.encode(text).ids) == text and tok.get_vocab_size() == 258
  assert tok.token_to_id(text_lib.EOS_TOKEN) == text_lib.ByteTokenizer.EOS
  assert tok.token_to_id(lm_mode.BOS_TOKEN) == text_lib.ByteTokenizer.BOS


def test_minilm_smoke_measures_a_tiny_bert(tiny_bert, tmp_path):
  config = _minilm(tiny_bert)
  results = run_lib.run(config, tmp_path, command="test")
  scores = results["embeddings"]
  assert scores["pairs"] == 48 and 0 <= scores["retrieval_top1"] <= scores["retrieval_mrr"] <= 1
  assert scores["mean_cosine"] == pytest.approx(1.0) and scores["neighbour_overlap"] == 1.0
  assert [r["batch"] for r in results["throughput"]] == [1, 4]
  assert all(r["sentences_per_second"] > 0 for r in results["throughput"])
  one, four = results["throughput"]  # the same 4 queries, one at a time and as one batch
  assert one["sentences"] == four["sentences"] == 4 and one["tokens"] == four["tokens"]
  assert one["padded_tokens"] == one["tokens"] <= four["padded_tokens"]
  task = json.loads((tmp_path / "retrieval_task.json").read_text())
  assert task["calibration"]["num_pairs"] == 16 and task["evaluation"]["num_pairs"] == 48
  assert not set(task["calibration"]["files"]) & set(task["evaluation"]["files"])
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["rows"][0][1:] == ["retrieval top-1", round(scores["retrieval_top1"], 4)]
  # measure_embeddings (what the compression modes call) reproduces the mode's figures, and a
  # perturbed model scores below 1 against the reference.
  checkpoint = hf.load_checkpoint(tiny_bert)
  pairs = retrieval.code_search_task(0, 16, 48, max_files=60).evaluation
  texts = embeddings_mode.pair_texts(pairs)
  reference = embeddings_mode.embed_pairs(checkpoint.model, checkpoint.tokenize, texts, 16)
  same = embeddings_mode.measure_embeddings(checkpoint.model, reference, texts,
                                            checkpoint.tokenize, batch_size=16)
  assert same["retrieval_top1"] == scores["retrieval_top1"]
  assert same["retrieval_mrr"] == pytest.approx(scores["retrieval_mrr"], abs=1e-12)
  noisy = hf.load_checkpoint(tiny_bert).model
  leaves, tree = jax.tree.flatten(nnx.state(noisy, nnx.Param))
  keys = jax.random.split(jax.random.key(0), len(leaves))
  nnx.update(noisy, jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                              for k, x in zip(keys, leaves)]))
  worse = embeddings_mode.measure_embeddings(noisy, reference, texts, checkpoint.tokenize,
                                             batch_size=16)
  assert 0 < worse["mean_cosine"] < 1 and worse["neighbour_overlap"] < 1


def test_padding_and_batching_do_not_change_embeddings(tiny_bert):
  checkpoint = hf.load_checkpoint(tiny_bert)
  texts = ["a", "def f(x, y=2):", "Return the frobnicated widget of the given size.", "ok"] * 3
  one = embeddings_mode.embed_texts(checkpoint.model, checkpoint.tokenize, texts, 1)
  many = embeddings_mode.embed_texts(checkpoint.model, checkpoint.tokenize, texts, 5)
  np.testing.assert_allclose(many, one, atol=1e-6)
  np.testing.assert_allclose(one, checkpoint.embed(texts), atol=1e-6)


def _one_line_error(config, workdir, match):
  with pytest.raises(ValueError, match=match) as error:
    run_lib.run(config, workdir)
  assert "\n" not in str(error.value)


def test_bad_input_gives_one_line_errors_before_anything_is_written(tmp_path, tiny_bert,
                                                                    llama_run):
  workdir = tmp_path / "w"
  missing = tmp_path / "no_such_model"
  hint = r"is not a folder .*config\.checkpoint at a Hugging Face checkpoint folder .*hf:owner"
  _one_line_error(_minilm(missing), workdir, hint)
  _one_line_error(_llama(missing), workdir, hint)
  _one_line_error(_minilm(""), workdir, "config.checkpoint is empty; the embeddings mode needs")
  _one_line_error(_llama(tiny_bert), workdir,
                  r"holds a 'bert' model; the lm mode needs a Llama .*model_type 'llama'")
  _one_line_error(_minilm(llama_run[0] / "checkpoint"), workdir,
                  r"holds a 'llama' model; the embeddings mode needs a BERT")
  _one_line_error(_llama(tokenizer="words"), workdir, "lm.tokenizer='words' is not one of")
  _one_line_error(_llama(fractions=(0.5, 0.2, 0.2)), workdir, "lm.fractions=.* sum to 1")
  _one_line_error(_llama(num_heads=3), workdir, "lm.hidden_size=32 must be lm.num_heads=3")
  _one_line_error(_minilm(tiny_bert, neighbours=96), workdir, "embeddings.neighbours=96")
  assert not workdir.exists()  # every one of them before the workdir was made
  # Found only once the files are read: an empty split, too few pairs.
  _one_line_error(_llama(fractions=(0.98, 0.01, 0.01)), workdir,
                  "the validation split of the standard-library corpus is empty")
  _one_line_error(_minilm(tiny_bert, evaluation_size=5000), workdir,
                  "fewer than the 16 \\+ 5000 asked for")


def test_every_variant_passes_the_checks():
  for module, variants in ((llama_config, ("", "bpe", "smoke")), (minilm_config, ("",))):
    for variant in variants:
      config = module.get_config(variant)
      assert config.mode in run_lib.TRANSFORMER_MODES
      if config.checkpoint and not (transformer.ROOT / config.checkpoint).is_dir():
        with pytest.raises(ValueError, match="is not a folder"):
          run_lib.check_config(config)
      else:
        run_lib.check_config(config)
  for module in (llama_config, minilm_config):
    with pytest.raises(ValueError, match="unknown variant"):
      module.get_config("huge")
