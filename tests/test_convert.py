"""Weight conversion: a Hugging Face BERT directory (random weights the test writes) converted into
the text tower and the fusion encoder matches transformers' own BERT on the same weights."""

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
from conftest import REPO
from flax import traverse_util
from transformers import BertConfig, FlaxBertModel

from rebalance_jax import convert
from rebalance_jax.config import defaults, spec
from rebalance_jax.infra.errors import InputError
from rebalance_jax.models import towers, weights
from rebalance_jax.models.fusion import FusionConfig, FusionEncoder
from rebalance_jax.models.student import Student, init_student, with_tower_weights
from rebalance_jax.models.towers import clip_vit, conversion
from rebalance_jax.models.towers import text as text_tower

pytestmark = pytest.mark.slow  # parity with PyTorch / transformers, and the convert command

CONFIG = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=37, max_position_embeddings=64)


def _pytorch_names(flax_params) -> dict[str, np.ndarray]:
  """transformers' Flax BERT parameters under their PyTorch names and layouts (weight = kernel.T;
  LayerNorm scale = weight; embedding = weight), as a model.safetensors holds them."""
  out = {}
  for path, value in traverse_util.flatten_dict(flax_params).items():
    *module, leaf = path
    value = np.asarray(value)
    if leaf == "kernel":
      leaf, value = "weight", value.T
    elif leaf in ("scale", "embedding"):
      leaf = "weight"
    out["bert." + ".".join((*module, leaf))] = np.ascontiguousarray(value)
  return out


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  reference = FlaxBertModel(CONFIG, seed=0)
  directory = tmp_path_factory.mktemp("bert")
  tensors = _pytorch_names(reference.params)
  tensors["cls.predictions.bias"] = np.zeros(99, np.float32)  # a pre-training head: dropped
  safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
  CONFIG.to_json_file(str(directory / "config.json"))
  return directory, reference


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 99, (3, 12)).astype(np.int32)
  mask = (np.arange(12)[None] < np.array([[12], [7], [3]])).astype(np.int32)  # padded rows
  return ids, mask


def _our_tower(params, fields):
  spec = towers.spec_from_config(defaults.tower("text", **fields).to_dict(),
                                 "config.model.text", "text", vocab_size=99)
  return lambda ids, mask: spec.build().apply({"params": params}, ids, mask)


def test_converted_bert_matches_transformers_bert(bert_dir, tmp_path):
  directory, reference = bert_dir
  config, tensors = conversion.read_hf_directory(str(directory))
  params, fields, dropped = text_tower.convert_hf_bert_text(config, tensors, range(3), max_tokens=16)
  pooler = "the pooler is not part of the text tower (it pools on its own)"
  assert dropped == {"bert.pooler.dense.weight": pooler, "bert.pooler.dense.bias": pooler,
                     "cls.predictions.bias": "pre-training heads are not part of the text tower"}
  ids, mask = _inputs()
  expected = reference(ids, attention_mask=mask).last_hidden_state
  out = _our_tower(params, fields)(ids, mask)
  np.testing.assert_allclose(out.tokens, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.pooled, expected[:, 0], rtol=1e-5, atol=1e-5)  # [CLS]

  # Through the file a tower's `init` reads.
  path = str(tmp_path / "text.safetensors")
  weights.save_safetensors(path, params)
  like = jax.eval_shape(lambda: params)
  for a, b in zip(jax.tree.leaves(weights.load_safetensors(path, like)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_a_layer_range_keeps_those_layers(bert_dir):
  directory, reference = bert_dir
  config, tensors = conversion.read_hf_directory(str(directory))
  params, fields, dropped = text_tower.convert_hf_bert_text(config, tensors, range(0, 2), 16)
  assert fields["depth"] == 2 and sum("layer.2." in n for n in dropped) == 16
  # The reference with its first two layers only.
  two = FlaxBertModel(BertConfig(**{**CONFIG.to_dict(), "num_hidden_layers": 2}), seed=1)
  kept = {**reference.params, "encoder": {"layer": {k: v for k, v in
                                                     reference.params["encoder"]["layer"].items()
                                                     if k in ("0", "1")}}}
  ids, mask = _inputs()
  expected = two(ids, attention_mask=mask, params=kept).last_hidden_state
  np.testing.assert_allclose(_our_tower(params, fields)(ids, mask).tokens, expected, rtol=1e-5,
                             atol=1e-5)


def test_unknown_or_missing_tensors_are_errors(bert_dir):
  directory, _ = bert_dir
  config, tensors = conversion.read_hf_directory(str(directory))
  with pytest.raises(InputError, match=r"1 tensors match no rule of the format: "
                                       r"bert\.adapter\.weight"):
    text_tower.convert_hf_bert_text(config, {**tensors, "bert.adapter.weight": np.zeros(2)},
                                 range(3), 16)
  partial = {k: v for k, v in tensors.items() if "layer.1.output.dense" not in k}
  with pytest.raises(InputError, match=r"missing \['layer1/mlp/fc2/bias', 'layer1/mlp/fc2/kernel'"):
    text_tower.convert_hf_bert_text(config, partial, range(3), 16)
  with pytest.raises(InputError, match=r"--max_tokens=100 exceeds the checkpoint's 64 positions"):
    text_tower.convert_hf_bert_text(config, tensors, range(3), 100)
  name = "bert.encoder.layer.0.attention.self.query.weight"
  odd = {**tensors, name: np.zeros((tensors[name].shape[0] - 1, tensors[name].shape[1]))}
  with pytest.raises(InputError, match=rf"tensor {re.escape(name)} \(\d+, \d+\) does not fit "
                                       r"this format's layout \(cannot reshape"):
    text_tower.convert_hf_bert_text(config, odd, range(3), 16)


def test_cli_converts_and_prints_the_config_fields(bert_dir, tmp_path):
  directory, _ = bert_dir
  output = tmp_path / "out.safetensors"
  result = subprocess.run(
      [sys.executable, "-m", "rebalance_jax.convert", "--format=hf_bert", f"--source={directory}",
       f"--output={output}", "--layers=0:2", "--max_tokens=16"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"--config.model.text.init={output}" in result.stdout
  assert "--config.model.text.depth=2" in result.stdout and output.exists()
  bad = subprocess.run(
      [sys.executable, "-m", "rebalance_jax.convert", "--format=hf_bert", f"--source={tmp_path}",
       f"--output={output}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 1 and "no config.json" in bad.stderr and "Traceback" not in bad.stderr
  (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_dict()))
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  bad = subprocess.run(
      [sys.executable, "-m", "rebalance_jax.convert", "--format=hf_bert", f"--source={tmp_path}",
       f"--output={output}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert "pytorch_model.bin: not a loadable PyTorch checkpoint" in bad.stderr


def test_pytorch_model_bin_converts_like_safetensors(bert_dir, tmp_path):
  torch = pytest.importorskip("torch", reason="reading pytorch_model.bin needs torch (the "
                              "convert extra)")
  directory, _ = bert_dir
  config, tensors = conversion.read_hf_directory(str(directory))
  (tmp_path / "config.json").write_text(json.dumps(config))
  torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / "pytorch_model.bin")
  from_pickle = text_tower.convert_hf_bert_text(*conversion.read_hf_directory(str(tmp_path)), range(3),
                                             16)[0]
  from_safetensors = text_tower.convert_hf_bert_text(config, tensors, range(3), 16)[0]
  jax.tree.map(np.testing.assert_array_equal, from_pickle, from_safetensors)
  # Arbitrary objects are never unpickled (weights_only=True).
  torch.save({"model": {"w": torch.zeros(1)}, "hook": print}, tmp_path / "pytorch_model.bin")
  with pytest.raises(InputError, match="not a loadable PyTorch checkpoint of tensors"):
    conversion.read_hf_directory(str(tmp_path))


FUSION_CONFIG = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4,
                           num_attention_heads=4, intermediate_size=37,
                           max_position_embeddings=64, add_cross_attention=True)


def test_fusion_layers_with_cross_attention_match_transformers_bert_layers(tmp_path):
  """A trained model's fusion layers (BERT layers with cross-attention, as the reference's):
  converted with their cross-attention, they compute what transformers' BERT layers compute."""
  from transformers.models.bert.modeling_flax_bert import FlaxBertLayer
  reference = FlaxBertModel(FUSION_CONFIG, seed=0)
  safetensors.numpy.save_file(_pytorch_names(reference.params), str(tmp_path / "model.safetensors"))
  FUSION_CONFIG.to_json_file(str(tmp_path / "config.json"))
  config, tensors = conversion.read_hf_directory(str(tmp_path))
  params, fields, dropped = text_tower.convert_hf_bert_fusion(config, tensors, range(2, 4))
  assert fields == {"depth": 2, "num_heads": 4, "mlp_dim": 37}
  assert not any(".layer.2." in n or ".layer.3." in n for n in dropped)
  rng = np.random.default_rng(1)
  text = rng.normal(size=(3, 12, 32)).astype(np.float32)
  _, mask = _inputs()
  image = rng.normal(size=(3, 7, 32)).astype(np.float32)
  image_mask = np.ones((3, 7), np.int32)
  expected = text
  for i in ("2", "3"):
    expected = FlaxBertLayer(FUSION_CONFIG).apply(
        {"params": reference.params["encoder"]["layer"][i]}, expected, mask, None,
        encoder_hidden_states=image, encoder_attention_mask=image_mask, deterministic=True)[0]
  ours = FusionEncoder(FusionConfig(**fields)).apply({"params": params}, text, mask, image,
                                                     image_mask)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_bert_base_fusion_layers_start_their_cross_attention_fresh(bert_dir, tmp_path,
                                                                   tiny_config):
  """bert-base has no cross-attention: the student loads the layers' self-attention and
  feed-forward weights and keeps its fresh cross-attention (docs/method.md §2)."""
  directory, _ = bert_dir
  out = tmp_path / "fusion.safetensors"
  convert.run("hf_bert", str(directory), str(out), conversion.Options(layers="1:3", part="fusion"))
  c = tiny_config
  c.model.text = defaults.text(16, 32, 1, 4, 37)
  c.model.fusion = defaults.fusion(2, 4, 37, init=str(out))
  model = Student(spec.from_config(c).student_config(vocab_size=50))
  fresh = init_student(model, jax.random.key(0))
  loaded = with_tower_weights(model, fresh)["fusion_encoder"]
  config, tensors = conversion.read_hf_directory(str(directory))
  converted, _, _ = text_tower.convert_hf_bert_fusion(config, tensors, range(1, 3))
  for layer in ("layer0", "layer1"):
    for part in ("attention", "attention_norm", "mlp", "mlp_norm"):
      for a, b in zip(jax.tree.leaves(loaded[layer][part]),
                      jax.tree.leaves(converted[layer][part])):
        np.testing.assert_array_equal(a, b)
    for part in ("cross_attention", "cross_attention_norm"):
      for a, b in zip(jax.tree.leaves(loaded[layer][part]),
                      jax.tree.leaves(fresh["fusion_encoder"][layer][part])):
        np.testing.assert_array_equal(a, b)
  c.model.fusion = defaults.fusion(2, 2, 37, init=str(out))  # another head count: refused
  model = Student(spec.from_config(c).student_config(vocab_size=50))
  with pytest.raises(InputError, match=r"config\.model\.fusion\.init=.*wrong shape"):
    with_tower_weights(model, init_student(model, jax.random.key(0)))


def test_converted_clip_vision_matches_transformers_clip(tmp_path):
  """A CLIP checkpoint (vision half, with text-side tensors to drop) into the clip_vit tower: its
  pooled [CLS] is CLIP's pooled output, its tokens CLIP's states after the post-norm."""
  from transformers import CLIPVisionConfig, FlaxCLIPVisionModel
  config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, image_size=16, patch_size=4)
  reference = FlaxCLIPVisionModel(config, seed=0)
  tensors = {}
  for path, value in traverse_util.flatten_dict(reference.params).items():
    *module, leaf = path
    value = np.asarray(value)
    if leaf == "kernel":  # PyTorch layouts: Linear (out, in), Conv2d (out, in, kh, kw)
      leaf, value = "weight", value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    elif leaf in ("scale", "embedding"):
      leaf = "weight"
    tensors[".".join((*module, leaf))] = np.ascontiguousarray(value)
  tensors["text_model.embeddings.token_embedding.weight"] = np.zeros((5, 8), np.float32)
  tensors["logit_scale"] = np.zeros((), np.float32)
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  config.to_json_file(str(tmp_path / "config.json"))
  hf_config, stored = conversion.read_hf_directory(str(tmp_path))
  params, fields, dropped = clip_vit.convert_hf_clip_vision(hf_config, stored)
  assert set(dropped) == {"text_model.embeddings.token_embedding.weight", "logit_scale"}
  images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  expected = reference(pixel_values=images.transpose(0, 3, 1, 2))
  spec = towers.spec_from_config(defaults.tower("clip_vit", **fields).to_dict(),
                                 "config.model.image", "image")
  out = spec.build().apply({"params": params}, images)
  np.testing.assert_allclose(out.pooled, expected.pooler_output, rtol=1e-5, atol=1e-5)
  post_norm = reference.module.apply(
      {"params": reference.params}, expected.last_hidden_state,
      method=lambda m, x: m.vision_model.post_layernorm(x))
  np.testing.assert_allclose(out.tokens, post_norm, rtol=1e-5, atol=1e-5)
