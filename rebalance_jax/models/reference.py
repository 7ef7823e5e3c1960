"""A model trained with the reference implementation (its `checkpoint_best.pth`) as this
project's whole student: `python -m rebalance_jax.convert --format=reference` writes the file
`config.model.init` reads, to evaluate it (`python -m rebalance_jax.evaluate --weights=...`) or to
train on from it."""

import re

import numpy as np

from rebalance_jax.infra.errors import InputError
from rebalance_jax.models.towers import conversion, swin
from rebalance_jax.models.towers import text as text_tower

# The reference's heads -> the student's parameters (docs/method.md §2; [ref] names, 'lamba' its own).
_REFERENCE_HEADS = {"vision_proj": "image_proj", "text_proj": "text_proj",
                    "sig_vision_proj": "teacher_image_proj", "sig_text_proj": "teacher_text_proj",
                    "itm_head.0": "itm_head/fc1", "itm_head.1": "itm_head/norm",
                    "itm_head.3": "itm_head/fc2"}
_REFERENCE_SCALARS = {"temp": "temp", "temp2": "temp2", "lamba": "lam"}


def convert_reference(tensors: dict[str, np.ndarray], image_size: int, max_tokens: int,
                      num_heads: int):
  """(the whole student's params, {config section: fields}, {dropped name: reason}) from a trained
  model of the reference implementation (its `checkpoint_best.pth` state dict): the Swin
  `vision_encoder`, the BERT `text_encoder` whose layers from the first with cross-attention on
  are the fusion encoder, the projections, the teacher projections (`sig_*`), the ITM head and
  the scalars τ, τ2 and the raw λ. `num_heads`: the BERT's attention heads (the weights do not
  tell them: a wrong count would load and compute something else)."""
  vision = {k: v for k, v in tensors.items() if k.startswith("vision_encoder.")}
  if "vision_encoder.patch_embed.proj.weight" not in vision:
    raise InputError("no vision_encoder.patch_embed.proj.weight: the reference checkpoint's image "
                     "tower is not a Swin (only Swin reference checkpoints are converted)")
  image, image_fields, dropped = swin.convert_swin(vision, image_size, prefix="vision_encoder.")
  text = {re.sub(r"^text_encoder\.(bert\.)?", "", k): v for k, v in tensors.items()
          if k.startswith("text_encoder.")}
  layers = {int(m.group(1)) for k in text if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
  cross = {int(m.group(1)) for k in text
           if (m := re.match(r"encoder\.layer\.(\d+)\.crossattention\.", k))}
  if not layers or not cross or cross != set(range(min(cross), max(layers) + 1)):
    raise InputError(f"text_encoder: layers {sorted(layers)} with cross-attention in "
                     f"{sorted(cross)}; expected the fusion layers to be the last ones")
  width = text["embeddings.word_embeddings.weight"].shape[1]
  if num_heads <= 0 or width % num_heads:
    raise InputError(f"--num_heads={num_heads} does not divide the BERT's width {width}")
  bert = {"hidden_size": width, "num_attention_heads": num_heads,
          "intermediate_size": text["encoder.layer.0.intermediate.dense.weight"].shape[0],
          "hidden_act": "gelu",
          "max_position_embeddings": text["embeddings.position_embeddings.weight"].shape[0]}
  fusion_start = min(cross)
  text_params, text_fields, text_dropped = text_tower.convert_hf_bert_text(
      bert, {k: v for k, v in text.items() if not _in_layers(k, range(fusion_start, 1 + max(layers)))},
      range(fusion_start), max_tokens)
  fusion_params, fusion_fields, fusion_dropped = text_tower.convert_hf_bert_fusion(
      bert, {k: v for k, v in text.items() if not k.startswith("embeddings.")
             and not _in_layers(k, range(fusion_start))}, range(fusion_start, max(layers) + 1))
  heads, head_dropped = conversion.apply_rules(
      {k: v for k, v in tensors.items() if not k.startswith(("vision_encoder.", "text_encoder."))},
      _reference_head_rules(), range(0), prefix="")
  missing = sorted(set(_REFERENCE_SCALARS.values()) - set(heads)) + sorted(
      ours for ours in _REFERENCE_HEADS.values() if not any(k.startswith(ours + "/") for k in heads))
  if missing:
    raise InputError(f"the reference checkpoint has nothing for the student's {missing}")
  params = {**conversion.tree(heads), "image_encoder": image, "text_encoder": text_params,
            "fusion_encoder": fusion_params}
  sections = {"model.image": {"kind": "swin", **image_fields}, "model.text": text_fields,
              "model.fusion": fusion_fields,
              "model": {"embed_dim": heads["image_proj/kernel"].shape[1]}}
  return params, sections, {**dropped, **text_dropped, **fusion_dropped, **head_dropped}


def _reference_head_rules():
  def head(ours):
    def to_ours(m, x):
      if m.group("kind") == "bias":
        return {f"{ours}/bias": x}
      return {f"{ours}/scale": x} if ours.endswith("norm") else {f"{ours}/kernel": x.T}
    return to_ours

  scalar = lambda ours: lambda m, x: {ours: x.reshape(())}
  return ([(rf"{re.escape(ref)}\.(?P<kind>weight|bias)", head(ours))
           for ref, ours in _REFERENCE_HEADS.items()] +
          [(re.escape(ref), scalar(ours)) for ref, ours in _REFERENCE_SCALARS.items()])


def _in_layers(name: str, span: range) -> bool:
  match = re.match(r"encoder\.layer\.(\d+)\.", name)
  return bool(match) and int(match.group(1)) in span


def _convert_file(source: str, options: conversion.Options) -> conversion.Converted:
  """--format=reference; the checkpoint's own config image_res wins over --image_size."""
  tensors, extra = conversion.read_pytorch(source)
  reference_config = extra.get("config")
  image_size = options.image_size
  if isinstance(reference_config, dict) and "image_res" in reference_config:
    image_size = int(reference_config["image_res"])
  num_heads = options.num_heads
  if not num_heads and isinstance(reference_config, dict):
    num_heads = int(reference_config.get("num_attention_heads", 0))
  if not num_heads:
    raise InputError(f"--source={source}: the checkpoint does not record its BERT's attention "
                     "heads; pass --num_heads (12 for a BERT-base text encoder)")
  params, sections, dropped = convert_reference(tensors, image_size, options.max_tokens,
                                                num_heads)
  widths = (params["teacher_image_proj"]["kernel"].shape[0],
            params["teacher_text_proj"]["kernel"].shape[0])
  return conversion.Converted(
      params, sections, "model.init", dropped, "<the reference's bert vocab.txt>",
      notes=(f"and teachers whose features are {widths[0]}-wide (image) and {widths[1]}-wide "
             "(text): the file's teacher projections (U_v, U_t) take those",))


conversion.register("reference", _convert_file)
