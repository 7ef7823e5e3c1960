"""The embedded default: the whole method on a procedural dataset, on a laptop CPU.

Command:
  python -m rebalance_jax.train --config=configs/demo.py --workdir=runs/demo

It generates the synthetic scene-caption dataset (3,000 train / 200 val / 1,000 test images, five
captions each; cached), pre-trains the image-only and text-only teachers, writes their features,
trains stage 1 (ITC + ITM) and stage 2 (all distillation terms), and evaluates each stage on the
1,000 test images. Expected: a few minutes on 2 CPU cores; R@1 far above the 0.1% chance level
(see README "Results of the demo").

Variants (--config=configs/demo.py:<arg>):
  tiny   a seconds-long smoke run (used by the tests).
"""

from rebalance_jax import config_base as common


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
  elif arg:
    raise ValueError(f"configs/demo.py: unknown variant {arg!r} (known: 'tiny')")
  return c
