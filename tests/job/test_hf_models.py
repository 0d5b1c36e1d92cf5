"""Hugging Face checkpoints as flax.nnx models (gkq_jax.job.models.hf, bert, llama).

Tiny random models go through save_checkpoint and load_checkpoint in the
transformers layout and come back bit for bit; the Llama forward pass is
checked against a plain numpy reading of the architecture, and the BERT one
against sentence-transformers' all-MiniLM-L6-v2 embeddings
(tests/data/minilm_golden.json, written by tools/minilm_golden.py). Each bad
folder gives a one-line error naming what is wrong.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import tokenizers
from flax import nnx

from gkq_jax.job.models import bert, hf, llama

HERE = pathlib.Path(__file__).resolve()
MINILM = HERE.parents[2].parent / "shared" / "models" / "all-MiniLM-L6-v2"
GOLDEN = HERE.parents[1] / "data" / "minilm_golden.json"

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
             max_position_embeddings=32)
BERT = bert.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=16)
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 7)).astype(np.int32)

_logits = nnx.jit(lambda model, tokens: model(tokens))
_embed = nnx.jit(lambda model, ids, mask: model.embed(ids, mask))


def _tokenizer():
  """A word-level tokenizer trained on a few strings."""
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"])
  tok.train_from_iterator(["the cat sat on the mat", "a dog ran far"], trainer)
  return tok


def _scramble(model, seed=1):
  """Every parameter random (norm scales and biases too), so a swapped name shows."""
  state = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(tree, [
    (0.5 * jax.random.normal(k, x.shape)).astype(x.dtype) for k, x in zip(keys, leaves)]))
  return model


def _tiny_llama(tied=False, param_dtype=jnp.float32, seed=1):
  config = llama.LlamaConfig(**LLAMA, tie_word_embeddings=tied)
  return _scramble(llama.create(config, param_dtype=param_dtype), seed), config


def _params(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for path in pa:
    assert pa[path].dtype == pb[path].dtype, path
    np.testing.assert_array_equal(pa[path], pb[path], err_msg=str(path))


def _names(folder):
  with safetensors.safe_open(folder / "model.safetensors", "np") as f:
    return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.mark.parametrize("tied", [False, True])
def test_llama_round_trip_in_transformers_layout(tmp_path, tied):
  model, config = _tiny_llama(tied)
  before = np.asarray(_logits(model, TOKENS))
  hf.save_checkpoint(model, config, tmp_path, tokenizer=_tokenizer())
  names = _names(tmp_path)
  assert names["model.embed_tokens.weight"] == ((64, 32), "F32")
  assert names["model.layers.0.self_attn.q_proj.weight"] == ((32, 32), "F32")  # (out, in)
  assert names["model.layers.1.self_attn.k_proj.weight"] == ((16, 32), "F32")  # 2 kv heads
  assert names["model.layers.0.mlp.gate_proj.weight"] == ((48, 32), "F32")
  assert names["model.layers.0.mlp.down_proj.weight"] == ((32, 48), "F32")
  assert names["model.norm.weight"] == ((32,), "F32")
  assert ("lm_head.weight" in names) == (not tied)
  assert len(names) == 2 + 2 * 9 + (0 if tied else 1)  # per layer: 2 norms, 4 + 3 projections
  q = safetensors.numpy.load_file(tmp_path / "model.safetensors")[
    "model.layers.0.self_attn.q_proj.weight"]
  np.testing.assert_array_equal(q, np.asarray(model.layers[0].self_attn.q_proj.kernel).T)
  assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] == tied

  loaded = hf.load_checkpoint(tmp_path)
  assert isinstance(loaded.model, llama.Llama) and loaded.model.config == config
  assert loaded.tokenizer.encode("the cat").ids == _tokenizer().encode("the cat").ids
  assert loaded.pooling is None
  _assert_same_params(model, loaded.model)
  np.testing.assert_array_equal(np.asarray(_logits(loaded.model, TOKENS)), before)


def _numpy_llama(t, config, tokens):
  """One forward pass straight from the transformers tensors, in float64."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  heads, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
  rms = lambda x, w: w * x / np.sqrt((x * x).mean(-1, keepdims=True) + config.rms_norm_eps)
  silu = lambda x: x / (1 + np.exp(-x))
  n = len(tokens)

  def rotate(x):  # (n, heads, d): frequency j turns the pair (j, j + d/2) by p * theta^(-2j/d)
    out = x.copy()
    for p in range(n):
      for j in range(d // 2):
        a = p * config.rope_theta ** (-2 * j / d)
        lo, hi = x[p, :, j], x[p, :, j + d // 2]
        out[p, :, j] = lo * np.cos(a) - hi * np.sin(a)
        out[p, :, j + d // 2] = hi * np.cos(a) + lo * np.sin(a)
    return out

  x = t["model.embed_tokens.weight"][tokens]
  for i in range(config.num_hidden_layers):
    w = lambda name: t[f"model.layers.{i}.{name}.weight"]
    h = rms(x, w("input_layernorm"))
    q = rotate((h @ w("self_attn.q_proj").T).reshape(n, heads, d))
    k = rotate((h @ w("self_attn.k_proj").T).reshape(n, kv, d))
    v = (h @ w("self_attn.v_proj").T).reshape(n, kv, d)
    out = np.zeros((n, heads, d))
    for head in range(heads):
      g = head // (heads // kv)  # the key/value head this query head shares
      scores = q[:, head] @ k[:, g].T / np.sqrt(d)
      scores[np.triu_indices(n, 1)] = -np.inf  # causal
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      out[:, head] = (probs / probs.sum(-1, keepdims=True)) @ v[:, g]
    x = x + out.reshape(n, -1) @ w("self_attn.o_proj").T
    h = rms(x, w("post_attention_layernorm"))
    x = x + (silu(h @ w("mlp.gate_proj").T) * (h @ w("mlp.up_proj").T)) @ w("mlp.down_proj").T
  x = rms(x, t["model.norm.weight"])
  return x @ t.get("lm_head.weight", t["model.embed_tokens.weight"]).T


@pytest.mark.parametrize("tied", [False, True])
def test_llama_matches_a_numpy_reading_of_the_architecture(tmp_path, tied):
  model, config = _tiny_llama(tied)
  hf.save_checkpoint(model, config, tmp_path, tokenizer=_tokenizer())
  tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  logits = np.asarray(_logits(hf.load_checkpoint(tmp_path).model, TOKENS))
  for row in range(len(TOKENS)):
    want = _numpy_llama(tensors, config, TOKENS[row])
    np.testing.assert_allclose(logits[row], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_bert_round_trip_with_sentence_transformers_pooling(tmp_path):
  pooling = bert.Pooling("mean", normalize=True, max_seq_length=12)
  model = _scramble(bert.create(BERT, pooler=True, pooling=pooling))
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3], np.int32)
  before = np.asarray(_embed(model, TOKENS, mask))
  np.testing.assert_allclose(np.linalg.norm(before, axis=-1), 1.0, rtol=1e-6)
  # Padding changes nothing: the short row alone embeds the same.
  np.testing.assert_allclose(np.asarray(_embed(model, TOKENS[1:, :4], mask[1:, :4]))[0],
                             before[1], atol=1e-6)
  hf.save_checkpoint(model, BERT, tmp_path, tokenizer=_tokenizer())
  names = _names(tmp_path)
  assert names["embeddings.word_embeddings.weight"] == ((64, 32), "F32")
  assert names["encoder.layer.0.attention.self.query.weight"] == ((32, 32), "F32")
  assert names["encoder.layer.1.intermediate.dense.weight"] == ((48, 32), "F32")
  assert names["encoder.layer.1.output.LayerNorm.bias"] == ((32,), "F32")
  assert names["pooler.dense.weight"] == ((32, 32), "F32")
  assert not any(k.startswith("bert.") for k in names)
  assert len(names) == 5 + 2 * 16 + 2

  loaded = hf.load_checkpoint(tmp_path)
  assert loaded.pooling == pooling and loaded.model.pooling == pooling
  _assert_same_params(model, loaded.model)
  np.testing.assert_array_equal(np.asarray(_embed(loaded.model, TOKENS, mask)), before)
  ids, mask = loaded.tokenize(["the cat sat", "a dog"])
  word = loaded.tokenizer.token_to_id
  # [PAD] (id 0) pads the short one
  np.testing.assert_array_equal(ids, [[word("the"), word("cat"), word("sat")],
                                      [word("a"), word("dog"), 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 1, 0]])


def test_bert_reads_legacy_names_and_buffers(tmp_path):
  model = _scramble(bert.create(BERT))
  hf.save_checkpoint(model, BERT, tmp_path, tokenizer=_tokenizer())
  # TensorFlow-converted checkpoints call LayerNorm's weight gamma; older
  # transformers saved the position_ids buffer.
  tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  tensors = {k.replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in tensors.items()}
  tensors["embeddings.position_ids"] = np.arange(16)[None]
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
  _assert_same_params(model, hf.load_checkpoint(tmp_path).model)


def test_tied_llama_may_store_its_embedding_as_lm_head(tmp_path):
  model, config = _tiny_llama(tied=True)
  hf.save_checkpoint(model, config, tmp_path, tokenizer=_tokenizer())
  copy = lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()})
  _edit_tensors(tmp_path, copy)  # transformers ignores such a copy, and so do we
  _assert_same_params(model, hf.load_checkpoint(tmp_path).model)
  _edit_tensors(tmp_path, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
  with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
    hf.load_checkpoint(tmp_path)


def test_sharded_checkpoint_loads_and_replaces_the_single_file(tmp_path):
  model, config = _tiny_llama()
  hf.save_checkpoint(model, config, tmp_path, tokenizer=_tokenizer())
  hf.save_checkpoint(model, config, tmp_path, tokenizer=_tokenizer(), shard_bytes=8192)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert not (tmp_path / "model.safetensors").exists()  # the old layout is gone
  assert index["metadata"]["total_size"] == sum(x.nbytes for x in _params(model).values())
  _assert_same_params(model, hf.load_checkpoint(tmp_path).model)


def test_bf16_tensors_stay_bf16(tmp_path):
  model, config = _tiny_llama(param_dtype=jnp.bfloat16)
  hf.save_checkpoint(model, config, tmp_path, tokenizer=_tokenizer())
  assert {dtype for _, dtype in _names(tmp_path).values()} == {"BF16"}
  loaded = hf.load_checkpoint(tmp_path)
  assert {x.dtype for x in _params(loaded.model).values()} == {jnp.dtype(jnp.bfloat16)}
  _assert_same_params(model, loaded.model)
  as_f32 = hf.load_checkpoint(tmp_path, dtype=jnp.float32)
  assert {x.dtype for x in _params(as_f32.model).values()} == {jnp.dtype(jnp.float32)}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llama")
  model, config = _tiny_llama()
  hf.save_checkpoint(model, config, folder, tokenizer=_tokenizer())
  return folder


def _edit_config(folder, **changes):
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _edit_tensors(folder, edit):
  tensors = safetensors.numpy.load_file(folder / "model.safetensors")
  edit(tensors)
  safetensors.numpy.save_file(tensors, folder / "model.safetensors")


def _nan(tensors):
  tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].copy()
  tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan


Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("break_it, message", [
  (lambda f: _edit_config(f, model_type="gpt2"),
   "model_type 'gpt2' is not supported; supported: bert, llama"),
  (lambda f: _edit_tensors(f, lambda t: t.pop(Q)), f"missing tensor '{Q}'"),
  (lambda f: _edit_tensors(f, lambda t: t.update(extra=np.zeros(3, np.float32))),
   "unexpected tensor 'extra'"),
  (lambda f: _edit_tensors(f, lambda t: t.update({Q: t[Q][:, :30].copy()})),
   f"tensor '{Q}' has shape (32, 30), expected (32, 32)"),
  (lambda f: _edit_tensors(f, _nan),
   "tensor 'model.layers.1.mlp.up_proj.weight' holds non-finite values"),
  (lambda f: (f / "tokenizer.json").unlink(), "has no tokenizer.json"),
  (lambda f: _edit_config(f, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
   "rope type 'llama3' is not supported"),
])
def test_bad_folders_give_one_line_errors_naming_the_problem(llama_folder, tmp_path, break_it,
                                                             message):
  folder = tmp_path / "broken"
  shutil.copytree(llama_folder, folder)
  hf.load_checkpoint(folder)  # the copy loads before it is broken
  break_it(folder)
  with pytest.raises(ValueError) as error:
    hf.load_checkpoint(folder)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_hf_name_without_network_says_to_pass_a_folder(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touches the network
  with pytest.raises(ValueError, match="could not download hf:gkq-jax-tests/no-such-model.*"
                     "HF_HUB_OFFLINE.*local folder instead") as error:
    hf.load_checkpoint("hf:gkq-jax-tests/no-such-model")
  assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match="is not a Hugging Face model name"):
    hf.load_checkpoint("hf:not a name")
  with pytest.raises(ValueError, match="is not a folder"):
    hf.load_checkpoint("/no/such/folder")


def test_a_refused_or_interrupted_save_writes_nothing(tmp_path, monkeypatch):
  model, config = _tiny_llama()
  wrong = llama.LlamaConfig(**{**LLAMA, "num_hidden_layers": 3})
  with pytest.raises(ValueError, match="model.layers.2.input_layernorm.weight"):
    hf.save_checkpoint(model, wrong, tmp_path / "a", tokenizer=_tokenizer())
  narrow = llama.LlamaConfig(**{**LLAMA, "intermediate_size": 40})
  with pytest.raises(ValueError, match="has shape \\(48, 32\\), expected \\(40, 32\\)"):
    hf.save_checkpoint(model, narrow, tmp_path / "a", tokenizer=_tokenizer())
  nnx.update(model, {"norm": {"scale": jnp.full(32, jnp.inf)}})
  with pytest.raises(ValueError, match="'model.norm.weight' holds non-finite"):
    hf.save_checkpoint(model, config, tmp_path / "a", tokenizer=_tokenizer())
  assert not (tmp_path / "a").exists()

  model, config = _tiny_llama()
  hf.save_checkpoint(model, config, tmp_path / "b", tokenizer=_tokenizer())
  before = sorted(p.name for p in (tmp_path / "b").iterdir())
  save_file, calls = safetensors.numpy.save_file, []

  def dies_on_the_third_shard(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 3:
      raise KeyboardInterrupt
    save_file(tensors, path, metadata=metadata)

  monkeypatch.setattr(safetensors.numpy, "save_file", dies_on_the_third_shard)
  with pytest.raises(KeyboardInterrupt):
    hf.save_checkpoint(_tiny_llama(seed=2)[0], config, tmp_path / "b", shard_bytes=8192)
  assert sorted(p.name for p in (tmp_path / "b").iterdir()) == before  # no shard, no temp file
  monkeypatch.undo()
  _assert_same_params(model, hf.load_checkpoint(tmp_path / "b").model)


@pytest.mark.skipif(not MINILM.is_dir(), reason=f"{MINILM} is not here (the shared models folder)")
def test_minilm_embeds_as_sentence_transformers_does():
  golden = json.loads(GOLDEN.read_text())
  checkpoint = hf.load_checkpoint(MINILM)
  assert checkpoint.pooling == bert.Pooling("mean", normalize=True, max_seq_length=256)
  ids, mask = checkpoint.tokenize(golden["sentences"])
  np.testing.assert_array_equal(ids, golden["input_ids"])
  np.testing.assert_array_equal(mask, golden["attention_mask"])
  ours = checkpoint.embed(golden["sentences"])
  assert np.abs(ours - np.array(golden["embeddings"])).max() <= 1e-4
