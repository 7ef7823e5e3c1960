"""A tiny Swin + BERT student for timing the train step against the reference's tiny config.

Command, like for like with the reference's tiny run (its MLP width, vocabulary and caption
length as flags; on one thread of the 2-core CPU this project's step took 0.0198 s and the
reference's 0.032 s, 2026-12-07):
  python bench/train_step.py --config=configs/bench_tiny.py --batch_size=8 --stage=stage2 \
      --threads=1 --vocab_size=200 --config.data.max_tokens=11 \
      --config.model.text.mlp_dim=128 --config.model.fusion.mlp_dim=128

The student: Swin at 64 px (patch 4, window 2, embed 32, depths 1-1-1-1, heads 1-2-4-8; heads
2-2-2-2 with --config.model.image.num_heads='(2,2,2,2)'), BERT layers of width 64 (2 text + 2
fusion), embed 32, BERT's vocabulary size (30,522), 32 tokens. The teachers matter to the bench
only through their output widths (64 and 64: the shapes of U_v, U_t and of the teacher features).
The data fields are the embedded synthetic dataset's, so `python -m rebalance_jax.train` runs it
too, but nothing here is tuned for training.
"""

from rebalance_jax.config import defaults as common


def get_config(arg: str = ""):
  if arg:
    raise ValueError(f"configs/bench_tiny.py: unknown variant {arg!r} (it has none)")
  c = common.base_config()
  c.data.image_size = 64
  c.data.max_tokens = 32
  c.data.augment_shift = 0  # as the reference configs: augmentation belongs to the data loader
  c.data.synthetic.update(num_train=48, num_val=8, num_test=16)
  c.tokenizer.vocab_size = 30522  # bert-base-uncased's size (a trained WordPiece stops short)
  c.model.image = common.tower("swin", image_size=64, patch_size=4, embed_dim=32,
                               depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=2,
                               mlp_ratio=4.0, dropout=0.0, drop_path=0.1)
  c.model.text = common.text(32, 64, 2, 2, 256, dropout=0.1)
  c.model.fusion = common.fusion(2, 2, 256, dropout=0.1)
  c.model.embed_dim = 32
  c.teachers.image = common.vit(64, 8, 64, 1, 2, 128)
  c.teachers.text = common.text(32, 64, 1, 2, 128)
  c.teachers.num_steps = 4
  c.teachers.batch_size = 8
  for stage in c.stages.values():
    stage.update(batch_size=8, num_epochs=0, num_steps=4)
  c.checkpoint.every_steps = 2
  c.log_every = 2
  c.eval.batch_size = 8
  c.eval.every_steps = 2
  return c
