"""VizWiz-Captions with the reference's student and hyperparameters (METHOD.md §2, §5, §6);
[ref] tests on 1,000 images of the official val split.

The student is configs/flickr.py's (Swin-B/384 + BERT-base 6+6 from converted checkpoints; see
its docstring for the convert commands) with captions of at most 40 tokens, so the text tower
is converted with --max_tokens=40 into weights/bert_base_uncased_text_40.safetensors.

Command (paths are local; nothing is downloaded):
  python -m rebalance_jax.train --config=configs/vizwiz.py --workdir=runs/vizwiz \\
      --config.data.image_root=/data/vizwiz/images \\
      --config.data.train_file=/data/vizwiz/train.json --config.data.test_file=/data/vizwiz/test.json

Expected: the paper's VizWiz rows once the real data pipeline and teachers land; until then it stops
with an error naming the missing converted file, path or loader.
"""

from rebalance_jax import config_base as common


def get_config(arg: str = ""):
  return common.reference_config("vizwiz", lr=5e-5, max_tokens=40, variant=arg)
