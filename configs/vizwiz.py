"""VizWiz-Captions with the reference's student, teachers and hyperparameters
(docs/method.md §2-§6).

The student and teachers are configs/flickr.py's (see its docstring for the convert commands)
with captions of at most 40 tokens, so the text tower and the text teacher are converted with
--max_tokens=40 (weights/bert_base_uncased_text_40.safetensors,
weights/bert_base_uncased_teacher_40.safetensors).

Command (local paths; nothing is downloaded):
  python -m rebalance_jax.train --config=configs/vizwiz.py --workdir=runs/vizwiz \\
      --config.data.image_root=/data/vizwiz \\
      --config.data.train_file=/data/vizwiz/annotations/train.json \\
      --config.data.val_file=/data/vizwiz/annotations/val.json

image_root holds train/ and val/ (the official layout). Rejected and pre-canned captions are
excluded (config.data.vizwiz.include_rejected / include_precanned); [ref] tests on 1,000 images of
the official val split (test_images). Model selection uses the remaining val images (val="rest");
[ref] uses the test images themselves (val="test", then selecting on val selects on test). An evaluation image needs 5 captions: val images with
fewer left after the exclusions are left out of evaluation, and prepare lists them. Variant :tiny
as configs/flickr.py's. Expected: the paper's VizWiz rows (not yet measured here).
"""

from rebalance_jax.config import defaults as common


def get_config(arg: str = ""):
  return common.reference_config("vizwiz", lr=5e-5, max_tokens=40, variant=arg)
