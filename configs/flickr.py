"""Flickr30K with the reference's student, teachers and hyperparameters (docs/method.md §2-§6).

The paper's student: Swin-B/384 (window 12) from the ImageNet-22k release, BERT-base layers 0-5 as
the text tower and 6-11 as the fusion encoder (fresh cross-attention). The frozen teachers: CLIP
ViT-L/14's vision tower (1024-d; its own 224 px view and CLIP normalization) and BERT-base, all
12 layers (768-d). Convert the public checkpoints once (local files; nothing is downloaded):

  mkdir -p weights && cp /models/bert-base-uncased/vocab.txt weights/bert-base-uncased-vocab.txt
  python -m rebalance_jax.convert --format=swin --image_size=384 --window_size=12 \\
      --source=/models/swin_base_patch4_window7_224_22k.pth \\
      --output=weights/swin_base_patch4_window12_384_22k.safetensors
  python -m rebalance_jax.convert --format=hf_bert --source=/models/bert-base-uncased \\
      --layers=0:6 --max_tokens=60 --output=weights/bert_base_uncased_text_60.safetensors
  python -m rebalance_jax.convert --format=hf_bert --part=fusion --layers=6:12 \\
      --source=/models/bert-base-uncased --output=weights/bert_base_uncased_fusion.safetensors
  python -m rebalance_jax.convert --format=hf_clip_vision --source=/models/clip-vit-large-patch14 \\
      --output=weights/clip_vit_large_patch14_vision.safetensors
  python -m rebalance_jax.convert --format=hf_bert --source=/models/bert-base-uncased \\
      --max_tokens=60 --output=weights/bert_base_uncased_teacher_60.safetensors

Data (local paths): the images and the Karpathy split file, or the reference's JSON lists with
--config.data.flickr30k.format=reference and --config.data.{train,val,test}_file. Command:
  python -m rebalance_jax.train --config=configs/flickr.py --workdir=runs/flickr \\
      --config.data.image_root=/data/flickr30k/flickr30k-images \\
      --config.data.annotation_file=/data/flickr30k/dataset_flickr30k.json

It prepares the dataset once (python -m rebalance_jax.prepare does that step alone), computes the
teachers' features (python -m rebalance_jax.teachers alone), trains stage 1 and stage 2 and
evaluates each on the 1,000 test images. [ref] also trains on the val images:
--config.data.flickr30k.add_val_to_train=True (then select with --config.eval.select_on=last or
test, as val is no longer held out). A missing converted file stops the run at once with one line
naming its config field; every path can be overridden. Global batch 36 as [ref] (2 GPUs x 18): it
must be a multiple of the device count. Expected: the paper's Flickr30K rows (not yet measured here: no
accelerator and no Flickr30K on this project's machines).

Variant :tiny (config.defaults.tiny_reference_model): the same data pipeline with tiny towers and
teachers, e.g. on the miniature trees of `python -m rebalance_jax.data.miniature --out=DIR`
(it prints the flags); about a minute on 2 CPU cores, numbers meaningless.
"""

from rebalance_jax.config import defaults as common


def get_config(arg: str = ""):
  return common.reference_config("flickr30k", lr=5e-5, max_tokens=60, variant=arg)
