"""MS-COCO (Karpathy split) with the reference hyperparameters (METHOD.md §5, §6).

Command:
  python -m rebalance_jax.train --config=configs/coco.py --workdir=runs/coco \
      --config.data.image_root=/data/coco/images \
      --config.data.train_file=/data/coco/train.json --config.data.test_file=/data/coco/test.json

Expected: the paper's COCO rows once the real data pipeline and paper-scale towers land; until
then it stops with an error naming the missing path or loader.
"""

from rebalance_jax import config_base as common


def get_config(arg: str = ""):
  del arg
  return common.reference_config("coco", lr=3e-5, max_tokens=40)
