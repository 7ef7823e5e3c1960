"""Flickr30K with the reference hyperparameters (METHOD.md §5, §6).

Command (paths are local; nothing is downloaded):
  python -m rebalance_jax.train --config=configs/flickr.py --workdir=runs/flickr \
      --config.data.image_root=/data/flickr30k/images \
      --config.data.train_file=/data/flickr30k/train.json \
      --config.data.test_file=/data/flickr30k/test.json

Expected: the paper's Flickr30K rows once the real data pipeline and the paper-scale towers (Swin-B,
BERT-base, converted weights) land; until then it stops with an error naming the missing path or
the missing loader. Global batch 36 as [ref] (2 GPUs × 18): it must divide the device count.
"""

from rebalance_jax import config_base as common


def get_config(arg: str = ""):
  del arg
  return common.reference_config("flickr30k", lr=5e-5, max_tokens=60)
