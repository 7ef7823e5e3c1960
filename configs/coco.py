"""MS-COCO (Karpathy split) with the reference's student and hyperparameters (METHOD.md §2, §5, §6).

The student is configs/flickr.py's (Swin-B/384 + BERT-base 6+6 from converted checkpoints; see
its docstring for the convert commands) with captions of at most 40 tokens, so the text tower
is converted with --max_tokens=40 into weights/bert_base_uncased_text_40.safetensors.

Command (paths are local; nothing is downloaded):
  python -m rebalance_jax.train --config=configs/coco.py --workdir=runs/coco \\
      --config.data.image_root=/data/coco/images \\
      --config.data.train_file=/data/coco/train.json --config.data.test_file=/data/coco/test.json

Expected: the paper's COCO rows once the real data pipeline and teachers land; until then it stops
with an error naming the missing converted file, path or loader.
"""

from rebalance_jax import config_base as common


def get_config(arg: str = ""):
  return common.reference_config("coco", lr=3e-5, max_tokens=40, variant=arg)
