"""CLIP's vision transformer (the reference's alternative image backbone): a bias-free patch
embedding, a class token and position embeddings, a pre-norm before the blocks, pre-norm blocks
with quick-GELU MLPs, and CLIP's post-norm, here applied to every token (the pooled [CLS] is then
exactly CLIP's pooled output). Preprocessing: CLIP's mean and std."""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rebalance_jax.infra.errors import InputError
from rebalance_jax.models import towers
from rebalance_jax.models.layers import PreNormBlock, block_class, embedding_init, patch_tokens
from rebalance_jax.models.towers import conversion

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ClipVitConfig:
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout: float = 0.0
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    towers.check_patch_grid(self.image_size, self.patch_size)


class ClipVisionTransformer(nn.Module):
  """Preprocessed images (B, S, S, 3) -> TowerOutput with 1 + (S / patch)^2 tokens."""
  config: ClipVitConfig

  @nn.compact
  def __call__(self, images, train: bool = False) -> towers.TowerOutput:
    c = self.config
    towers.check_image_size(c, images)
    dtype = towers.compute_dtype(c)
    x = patch_tokens(images, c.width, c.patch_size, dtype, use_bias=False)
    cls = self.param("cls", embedding_init, (c.width,)).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, c.width)), x], axis=1)
    x = x + self.param("pos_embed", embedding_init, (x.shape[1], c.width)).astype(x.dtype)
    x = nn.LayerNorm(epsilon=1e-5, dtype=dtype, name="pre_norm")(x)
    block = block_class(PreNormBlock, c.remat)
    for i in range(c.depth):
      x = block(c.num_heads, c.mlp_dim, c.dropout, dtype, 1e-5, "quick_gelu",
                name=f"block{i}")(x, train)
    x = nn.LayerNorm(epsilon=1e-5, dtype=dtype, name="norm")(x).astype(jnp.float32)
    return towers.TowerOutput(x, x[:, 0], jnp.ones(x.shape[:2], jnp.int32))


def convert_hf_clip_vision(hf_config: dict, tensors: dict[str, np.ndarray]):
  """(params of the `clip_vit` tower, its fields, {dropped name: reason}) from a Hugging Face CLIP
  (or CLIP vision) checkpoint; the text half and the projections are dropped."""
  c = hf_config.get("vision_config", hf_config)
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "image_size", "patch_size"):
    if key not in c:
      raise InputError(f"config.json has no {key!r}: not a CLIP vision config")
  if c.get("hidden_act", "quick_gelu") != "quick_gelu":
    raise InputError(f"config.json: hidden_act={c['hidden_act']!r}; the clip_vit tower uses "
                     "quick_gelu")
  fields = {"image_size": c["image_size"], "patch_size": c["patch_size"],
            "width": c["hidden_size"], "depth": c["num_hidden_layers"],
            "num_heads": c["num_attention_heads"], "mlp_dim": c["intermediate_size"]}
  heads, layers = fields["num_heads"], range(fields["depth"])
  kind = r"(?P<kind>weight|bias)"
  leaf = lambda m: "scale" if m.group("kind") == "weight" else "bias"
  norm = lambda ours: lambda m, x: {f"{ours(m)}/{leaf(m)}": x}
  block = lambda m: f"block{m.group(1)}"

  def dense(name, layout):
    def to_ours(m, x):
      leaf, value = conversion.from_linear(x, m.group("kind"), layout, heads)
      return {f"{block(m)}/{name(m)}/{leaf}": value}
    return to_ours

  qkv = {"q": "query", "k": "key", "v": "value"}
  rules = [
      (r"embeddings\.class_embedding", lambda m, x: {"cls": x}),
      (r"embeddings\.patch_embedding\.weight",
       lambda m, x: {"patch_embed/kernel": x.transpose(2, 3, 1, 0)}),
      (r"embeddings\.position_embedding\.weight", lambda m, x: {"pos_embed": x}),
      (r"embeddings\.position_ids", "a buffer, not a weight"),
      (rf"pre_layrnorm\.{kind}", norm(lambda m: "pre_norm")),
      (rf"post_layernorm\.{kind}", norm(lambda m: "norm")),
      (rf"encoder\.layers\.(\d+)\.layer_norm([12])\.{kind}",
       norm(lambda m: f"block{m.group(1)}/norm{m.group(2)}")),
      (rf"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.{kind}",
       dense(lambda m: f"attention/{qkv[m.group(2)]}", "qkv")),
      (rf"encoder\.layers\.(\d+)\.self_attn\.out_proj\.{kind}",
       dense(lambda m: "attention/out", "out")),
      (rf"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.{kind}",
       dense(lambda m: f"mlp/{m.group(2)}", "plain")),
      (r"text_model\..*", "the text half of CLIP is not part of the image tower"),
      (r"(visual|text)_projection\..*|logit_scale",
       "CLIP's projections are not part of the image tower (the student has its own)"),
  ]
  params, dropped = conversion.apply_rules(tensors, rules, layers, prefix="vision_model.")
  spec = towers.spec_from_config({"kind": "clip_vit", **fields}, "--source", "image")
  conversion.check_filled(params, conversion.tower_shapes(spec), "clip_vit tower")
  return conversion.tree(params), fields, dropped




def _convert_hf(source: str, options: conversion.Options) -> conversion.Converted:
  """--format=hf_clip_vision: a Hugging Face CLIP or CLIP-vision directory -> the `clip_vit`
  tower."""
  params, fields, dropped = convert_hf_clip_vision(*conversion.read_hf_directory(source))
  return conversion.Converted(params, {"model.image": {"kind": "clip_vit", **fields}},
                              "model.image.init", dropped)


towers.register("clip_vit", towers.TowerKind("image", ClipVitConfig, ClipVisionTransformer,
                                               converters={"hf_clip_vision": _convert_hf}))
