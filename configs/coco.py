"""MS-COCO (Karpathy split) with the reference's student, teachers and hyperparameters
(docs/method.md §2-§6).

The student and teachers are configs/flickr.py's (see its docstring for the convert commands)
with captions of at most 40 tokens, so the text tower and the text teacher are converted with
--max_tokens=40 (weights/bert_base_uncased_text_40.safetensors,
weights/bert_base_uncased_teacher_40.safetensors).

Command (local paths; nothing is downloaded):
  python -m rebalance_jax.train --config=configs/coco.py --workdir=runs/coco \\
      --config.data.image_root=/data/coco \\
      --config.data.annotation_file=/data/coco/dataset_coco.json

image_root holds train2014/ and val2014/ (the Karpathy file's filepath/filename). Training uses
the train and restval images (113,287; --config.data.coco.use_restval=False: train only); the test
split is the 5,000 Karpathy test images with their first 5 captions, and COCO-1K (the first 1,000)
is reported too (config.eval.subsets). Variant :tiny as configs/flickr.py's. Expected: the paper's
COCO rows (not yet measured here).
"""

from rebalance_jax.config import defaults as common


def get_config(arg: str = ""):
  return common.reference_config("coco", lr=3e-5, max_tokens=40, variant=arg)
