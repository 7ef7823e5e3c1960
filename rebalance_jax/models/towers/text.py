"""Text tower in BERT's layout (word/position/type embeddings, post-norm layers), so that BERT
checkpoints convert into it. Its pooled output is `pooling`: "cls", position 0 ([CLS], BERT's and
the reference's), or "mean", the mean of the hidden states over the real tokens (mask 1), as
sentence-transformers pools all-MiniLM-L6-v2. `vocab_size` always comes from the tokenizer, never
from the config."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rebalance_jax.infra.errors import InputError
from rebalance_jax.models import towers
from rebalance_jax.models.fusion import FusionConfig, FusionEncoder
from rebalance_jax.models.layers import PostNormBlock, block_class, embedding_init
from rebalance_jax.models.towers import conversion

POOLINGS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 1000
  max_tokens: int = 24
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.0
  dtype: str = "float32"
  remat: bool = False
  pooling: str = "cls"  # the pooled output: "cls" (position 0) or "mean" (over real tokens)

  def __post_init__(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling={self.pooling!r} is not one of {POOLINGS}")


def mean_pool(x, mask):
  """(B, L, W) states, (B, L) mask -> (B, W): the mean over the positions where mask is 1 (a row
  without any is 0)."""
  weights = mask.astype(x.dtype)[..., None]
  return (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


class TextEncoder(nn.Module):
  """Token ids (B, L) and mask -> TowerOutput of hidden states (B, L, width)."""
  config: TextConfig

  @nn.compact
  def __call__(self, ids, mask, train: bool = False) -> towers.TowerOutput:
    c = self.config
    if ids.shape[1] > c.max_tokens:
      raise ValueError(f"text tower takes at most {c.max_tokens} tokens, got {ids.shape[1]}")
    dtype = towers.compute_dtype(c)
    embed = lambda n, name: nn.Embed(n, c.width, embedding_init=embedding_init, dtype=dtype,
                                     name=name)
    x = embed(c.vocab_size, "word_embed")(ids)
    x = x + embed(c.max_tokens, "position_embed")(jnp.arange(ids.shape[1])[None])
    x = x + embed(2, "type_embed")(jnp.zeros_like(ids))
    x = nn.LayerNorm(epsilon=1e-12, dtype=dtype, name="embed_norm")(x)
    x = nn.Dropout(c.dropout)(x, deterministic=not train)
    layer = block_class(PostNormBlock, c.remat)
    for i in range(c.depth):
      x = layer(c.num_heads, c.mlp_dim, c.dropout, dtype=dtype, name=f"layer{i}")(x, train, mask)
    x = x.astype(jnp.float32)
    pooled = mean_pool(x, mask) if c.pooling == "mean" else x[:, 0]
    return towers.TowerOutput(x, pooled, mask)


def hf_bert_text_fields(hf_config: dict, layers: range, max_tokens: int) -> dict:
  """The `text` tower fields that match a BERT config and a layer range."""
  for key in ("hidden_size", "num_attention_heads", "intermediate_size", "hidden_act"):
    if key not in hf_config:
      raise InputError(f"config.json has no {key!r}: not a BERT config")
  if hf_config["hidden_act"] != "gelu":
    raise InputError(f"config.json: hidden_act={hf_config['hidden_act']!r}; the text tower uses "
                     "BERT's exact gelu")
  if hf_config.get("type_vocab_size", 2) != 2:
    raise InputError(f"config.json: type_vocab_size={hf_config['type_vocab_size']}; the text "
                     "tower has 2 token types")
  if max_tokens > hf_config.get("max_position_embeddings", 512):
    raise InputError(f"--max_tokens={max_tokens} exceeds the checkpoint's "
                     f"{hf_config['max_position_embeddings']} positions")
  return {"width": hf_config["hidden_size"], "depth": len(layers),
          "num_heads": hf_config["num_attention_heads"],
          "mlp_dim": hf_config["intermediate_size"], "max_tokens": max_tokens}


def _bert_rules(layers: range, num_heads: int, max_tokens: int, part: str = "text"):
  """(pattern, target) rules over BERT names without the 'bert.' prefix; a target maps the match
  and the (PyTorch-layout) tensor to {our path: array}, or is a string: why it is dropped.
  `part`: "text" (embeddings and layers) or "fusion" (layers, with their cross-attention)."""
  def layer(match):
    index = int(match.group(1))
    return f"layer{index - layers.start}" if index in layers else None

  def dense(path):
    def to_ours(m, x):
      if layer(m) is None:
        return None
      leaf, value = conversion.from_linear(x, m.group("kind"), path[1], num_heads)
      return {f"{layer(m)}/{path[0].format(m)}/{leaf}": value}
    return to_ours

  def norm(ours):
    def to_ours(m, x):
      prefix = "" if ours == "embed_norm" else f"{layer(m)}/"
      if prefix and layer(m) is None:
        return None
      return {f"{prefix}{ours}/{'scale' if m.group('kind') in ('weight', 'gamma') else 'bias'}": x}
    return to_ours

  kind = r"(?P<kind>weight|bias|gamma|beta)"
  if part == "text":
    embeddings = [
        (r"embeddings\.word_embeddings\.weight", lambda m, x: {"word_embed/embedding": x}),
        (r"embeddings\.position_embeddings\.weight",
         lambda m, x: {"position_embed/embedding": x[:max_tokens]}),
        (r"embeddings\.token_type_embeddings\.weight", lambda m, x: {"type_embed/embedding": x}),
        (rf"embeddings\.LayerNorm\.{kind}", norm("embed_norm")),
        (r"encoder\.layer\.\d+\.crossattention\..*", "the text tower has no cross-attention"),
    ]
  else:
    embeddings = [
        (r"embeddings\..*", "the fusion encoder reads the text tower's states, not embeddings"),
        (rf"encoder\.layer\.(\d+)\.crossattention\.self\.(query|key|value)\.{kind}",
         dense(("cross_attention/{0[2]}", "qkv"))),
        (rf"encoder\.layer\.(\d+)\.crossattention\.output\.dense\.{kind}",
         dense(("cross_attention/out", "out"))),
        (rf"encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.{kind}",
         norm("cross_attention_norm")),
    ]
  return embeddings + [
      (rf"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.{kind}",
       dense(("attention/{0[2]}", "qkv"))),
      (rf"encoder\.layer\.(\d+)\.attention\.output\.dense\.{kind}",
       dense(("attention/out", "out"))),
      (rf"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.{kind}", norm("attention_norm")),
      (rf"encoder\.layer\.(\d+)\.intermediate\.dense\.{kind}", dense(("mlp/fc1", "plain"))),
      (rf"encoder\.layer\.(\d+)\.output\.dense\.{kind}", dense(("mlp/fc2", "plain"))),
      (rf"encoder\.layer\.(\d+)\.output\.LayerNorm\.{kind}", norm("mlp_norm")),
      (r"pooler\..*", f"the pooler is not part of the {part} tower (it pools on its own)"),
      (r"cls\..*", f"pre-training heads are not part of the {part} tower"),
      (r"embeddings\.position_ids", "a buffer, not a weight"),
  ]


def convert_hf_bert_text(hf_config: dict, tensors: dict[str, np.ndarray], layers: range,
                         max_tokens: int, vocab_size: int | None = None):
  """(params of the `text` tower, its fields, {dropped name: reason}) from a BERT checkpoint."""
  fields = hf_bert_text_fields(hf_config, layers, max_tokens)
  params, dropped = conversion.apply_rules(tensors, _bert_rules(layers, fields["num_heads"], max_tokens),
                                 layers)
  vocab_size = vocab_size or params.get("word_embed/embedding", np.zeros((0,))).shape[0]
  spec = towers.spec_from_config({"kind": "text", **fields}, "--source", "text",
                                 vocab_size=vocab_size)
  conversion.check_filled(params, conversion.tower_shapes(spec), "text tower")
  return conversion.tree(params), fields, dropped


def convert_hf_bert_fusion(hf_config: dict, tensors: dict[str, np.ndarray], layers: range):
  """(params of the fusion encoder, its config fields, {dropped name: reason}) from the layers
  `layers` of a BERT checkpoint. Their self-attention and feed-forward weights are BERT's; their
  cross-attention comes from the checkpoint when it has one (a trained model of the reference),
  else it is absent and the student initializes it fresh (docs/method.md §2)."""
  text = hf_bert_text_fields(hf_config, layers, 1)
  fields = {"depth": text["depth"], "num_heads": text["num_heads"], "mlp_dim": text["mlp_dim"]}
  params, dropped = conversion.apply_rules(
      tensors, _bert_rules(layers, fields["num_heads"], 0, part="fusion"), layers)
  width = text["width"]
  image_width = params.get("layer0/cross_attention/key/kernel", np.zeros((width,))).shape[0]
  module = FusionEncoder(FusionConfig(**fields))
  like = jax.eval_shape(lambda r: module.init(
      r, jnp.zeros((1, 2, width)), jnp.ones((1, 2), jnp.int32), jnp.zeros((1, 3, image_width)),
      jnp.ones((1, 3), jnp.int32))["params"], jax.random.key(0))
  conversion.check_filled(params, conversion.flat_shapes(like), "fusion encoder",
                          fresh="cross_attention")
  return conversion.tree(params), fields, dropped




def _convert_hf_bert(source: str, options: conversion.Options) -> conversion.Converted:
  """--format=hf_bert: a Hugging Face BERT directory -> the `text` tower (--layers, its position
  table cut to --max_tokens) or, with --part=fusion, the fusion encoder."""
  hf_config, tensors = conversion.read_hf_directory(source)
  span = conversion.layer_range(options.layers, hf_config.get("num_hidden_layers", 0))
  if options.part == "fusion":
    params, fields, dropped = convert_hf_bert_fusion(hf_config, tensors, span)
    return conversion.Converted(params, {"model.fusion": fields}, "model.fusion.init", dropped)
  if options.part != "text":
    raise InputError(f"--part={options.part!r} is not one of ('text', 'fusion')")
  params, fields, dropped = convert_hf_bert_text(hf_config, tensors, span, options.max_tokens)
  vocab = os.path.join(source, "vocab.txt")
  return conversion.Converted(params, {"model.text": fields}, "model.text.init", dropped,
                              vocab if os.path.exists(vocab) else "")


towers.register("text", towers.TowerKind("text", TextConfig, TextEncoder,
                                           converters={"hf_bert": _convert_hf_bert}))
