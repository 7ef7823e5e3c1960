"""Flickr30K with the reference's student and hyperparameters (METHOD.md §2, §5, §6).

The paper's student: Swin-B/384 (window 12) from the ImageNet-22k release, BERT-base layers 0-5 as
the text tower and 6-11 as the fusion encoder (fresh cross-attention). Convert the public
checkpoints once (local files; nothing is downloaded):

  mkdir -p weights && cp /models/bert-base-uncased/vocab.txt weights/bert-base-uncased-vocab.txt
  python -m rebalance_jax.convert --format=swin --image_size=384 --window_size=12 \
      --source=/models/swin_base_patch4_window7_224_22k.pth \
      --output=weights/swin_base_patch4_window12_384_22k.safetensors
  python -m rebalance_jax.convert --format=hf_bert --source=/models/bert-base-uncased \
      --layers=0:6 --max_tokens=60 --output=weights/bert_base_uncased_text_60.safetensors
  python -m rebalance_jax.convert --format=hf_bert --part=fusion --layers=6:12 \
      --source=/models/bert-base-uncased --output=weights/bert_base_uncased_fusion.safetensors

Command (paths are local):
  python -m rebalance_jax.train --config=configs/flickr.py --workdir=runs/flickr \
      --config.data.image_root=/data/flickr30k/images \
      --config.data.train_file=/data/flickr30k/train.json \
      --config.data.test_file=/data/flickr30k/test.json

A missing converted file stops the run at once with one line naming its config field (e.g.
config.model.image.init); each path can be overridden (--config.model.image.init=...).
Expected: the paper's Flickr30K rows once the real data pipeline and teachers land; until then it
stops with an error naming the missing path or loader. Global batch 36 as [ref] (2 GPUs × 18): it
must divide the device count.
"""

from rebalance_jax import config_base as common


def get_config(arg: str = ""):
  return common.reference_config("flickr30k", lr=5e-5, max_tokens=60, variant=arg)
