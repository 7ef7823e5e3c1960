"""Weight conversion: other frameworks' checkpoints -> safetensors trees of our towers.

  python -m rebalance_jax.convert --format=hf_bert --source=/models/bert-base-uncased \\
      --output=weights/bert_text.safetensors --layers=0:6 --max_tokens=40

Formats:
  hf_bert   a Hugging Face BERT directory (config.json + model.safetensors or pytorch_model.bin)
            -> the `text` tower
            (--layers selects the encoder layers, e.g. 0:6 for the paper's text encoder; the
            position table is cut to --max_tokens), or with --part=fusion the fusion encoder
            (e.g. --layers=6:12; cross-attention from the checkpoint if it has one, else fresh)
  hf_clip_vision  a Hugging Face CLIP or CLIP-vision directory -> the `clip_vit` image tower
  swin      a Swin release file ({'model': state_dict}, e.g. swin_base_patch4_window7_224_22k.pth)
            -> the `swin` tower at --image_size, its relative-position tables resized to
            --window_size (the paper's: --image_size=384 --window_size=12)
  reference a trained model of the reference implementation (checkpoint_best.pth) -> the whole
            student (towers, fusion encoder, projections, ITM head, τ, τ2, λ), for
            --config.model.init: evaluate it (python -m rebalance_jax.evaluate --weights=...) or
            continue training from it

Each tower's formats sit with the tower (models/towers/, its registry entry), the whole
student's in models/reference.py; models/towers/conversion.py holds what they share: explicit name
rules (every source tensor mapped, or dropped by a rule that says why; every parameter filled
with the right shape; anything else an error listing the names). The output is what a tower's
`init` reads (`weights.load_safetensors`); the command prints the config fields that match it.
PyTorch pickles (`.pth`, `pytorch_model.bin`) are read with torch (the `convert` extra,
`weights_only=True`); training never imports it.
"""

from absl import app, flags
from flax import traverse_util

from rebalance_jax import cli
from rebalance_jax.models.towers import conversion, swin

_FORMAT = flags.DEFINE_string("format", None, "The source checkpoint's format: hf_bert, "
                              "hf_clip_vision, swin, reference, or one a registered tower adds.")
_SOURCE = flags.DEFINE_string("source", None, "The source checkpoint (hf_*: a directory; swin: "
                              "the release's .pth file; reference: its checkpoint_best.pth).")
_OUTPUT = flags.DEFINE_string("output", None, "The safetensors file to write.")
_PART = flags.DEFINE_enum("part", "text", ["text", "fusion"], "hf_bert: convert into the text "
                          "tower or into the fusion encoder (its cross-attention from the "
                          "checkpoint if it has one, else initialized fresh).")
_LAYERS = flags.DEFINE_string("layers", "", "hf_bert: encoder layers START:STOP (default: all).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 512, "hf_bert: the tower's max_tokens (the "
                                   "position table is cut to it).", lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 384, "swin, reference: the image tower's input "
                                   "size (reference: the checkpoint's config image_res wins).",
                                   lower_bound=1)
_NUM_HEADS = flags.DEFINE_integer("num_heads", 0, "reference: the BERT's attention heads (12 for "
                                  "BERT-base); needed unless the checkpoint's config records "
                                  "them.", lower_bound=0)
_WINDOW_SIZE = flags.DEFINE_integer("window_size", 0, "swin: the tower's window (0: the "
                                    "checkpoint's); the relative-position tables are resized.",
                                    lower_bound=0)
_INTERPOLATION = flags.DEFINE_enum("rel_pos_interpolation", "geometric", list(swin.INTERPOLATIONS),
                                   "swin: how the relative-position tables are resized: "
                                   "'geometric' (the reference's loader) or 'bicubic' (Swin's).")


def run(format_: str, source: str, output: str,
        options: conversion.Options) -> conversion.Converted:
  """Converts `source` into `output` and prints what it wrote and the config fields that use
  it."""
  converted = conversion.convert(format_, source, output, options)
  print(f"wrote {output}: {len(traverse_util.flatten_dict(converted.params))} tensors; dropped "
        f"{len(converted.dropped)} ({', '.join(sorted(set(converted.dropped.values())))})")
  first, *more = conversion.usage_lines(converted, output)
  print("\n  ".join([f"use it {first}", *more]))
  return converted


def main(argv):
  options = conversion.Options(
      layers=_LAYERS.value, max_tokens=_MAX_TOKENS.value, part=_PART.value,
      image_size=_IMAGE_SIZE.value, window_size=_WINDOW_SIZE.value,
      interpolation=_INTERPOLATION.value, num_heads=_NUM_HEADS.value)
  cli.run_guarded("rebalance_jax.convert", argv,
                  lambda: run(_FORMAT.value, _SOURCE.value, _OUTPUT.value, options))


if __name__ == "__main__":
  flags.mark_flags_as_required(["format", "source", "output"])
  app.run(main, flags_parser=cli.parse_flags)
