"""VizWiz-Captions with the reference hyperparameters (METHOD.md §5, §6); [ref] tests on 1,000
images of the official val split.

Command:
  python -m rebalance_jax.train --config=configs/vizwiz.py --workdir=runs/vizwiz \
      --config.data.image_root=/data/vizwiz/images \
      --config.data.train_file=/data/vizwiz/train.json --config.data.test_file=/data/vizwiz/test.json

Expected: the paper's VizWiz rows once the real data pipeline and paper-scale towers land; until
then it stops with an error naming the missing path or loader.
"""

from rebalance_jax import config_base as common


def get_config(arg: str = ""):
  del arg
  return common.reference_config("vizwiz", lr=5e-5, max_tokens=40)
