"""The ablation study of the method on the demo's data (configs/demo.py): does structure-aware
distillation help, against an equal-compute baseline, over seeds and imbalance levels?

Command:
  python -m rebalance_jax.ablation --config=configs/ablation.py --workdir=runs/ablation

Every run is the demo's student and schedule at `study.num_steps` steps per stage: stage 1
(ITC + ITM), then one arm's stage from stage 1's selected checkpoint (rebalance_jax/study/grid.py
lists the arms). The baseline arm trains ITC + ITM for as many steps as stage 1 + stage 2 of
every other arm. Runs on the same (student, level, seed) share the teachers, their features and
stage 1. The workdir ends up with report.md, its figures, and study.json (every run's test
metrics). Expected on 2 CPU cores: about 80 minutes for the 51 runs (1 h 21 min measured, with
a test run sharing the cores for 20 of them); the results are in docs/ablation/report.md, in short
in docs/demo.md.

Variants (--config=configs/ablation.py:<arg>):
  quick   one seed, the main arms at 100 steps per stage: 6 minutes, to see the report.
  tiny    the demo's tiny smoke config: one seed of the baseline and full_faithful (the
          end-to-end test; the statistics over seeds are tested on records).

Imbalance levels are the 2 x 2 of the synthetic data's two knobs, at the demo's own values:
captions mention each fact with probability caption_keep_prob (text insufficiency), and a
degrade_fraction of images are noised, occluded or blurred (image insufficiency).
"""

import importlib.util
import os

import ml_collections

MAIN_ARMS = ("baseline", "repr_only", "structure_only", "full_faithful", "full_fixed", "lambda_0",
             "lambda_half", "lambda_1", "mse")
COMPARED_ARMS = ("baseline", "full_faithful")  # at the other levels and with the dual encoder
LEVELS = {
    "demo": dict(caption_keep_prob=0.6, degrade_fraction=0.2),  # both modalities insufficient
    "balanced": dict(caption_keep_prob=1.0, degrade_fraction=0.0),
    "text_insufficient": dict(caption_keep_prob=0.6, degrade_fraction=0.0),
    "image_insufficient": dict(caption_keep_prob=1.0, degrade_fraction=0.2),
}


def _demo_config(arg: str):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
  module_spec = importlib.util.spec_from_file_location("demo_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str = ""):
  if arg not in ("", "quick", "tiny"):
    raise ValueError(f"configs/ablation.py: unknown variant {arg!r} (known: 'quick', 'tiny')")
  c = _demo_config("tiny" if arg == "tiny" else "")
  groups = [("fusion", "demo", MAIN_ARMS)]
  groups += [("fusion", level, COMPARED_ARMS) for level in LEVELS if level != "demo"]
  groups.append(("dual_encoder", "demo", COMPARED_ARMS))
  c.study = ml_collections.ConfigDict(dict(
      seeds=(0, 1, 2), num_steps=500, levels=LEVELS, groups=tuple(groups),
      # The report's figures: this trunk (student, level) at the first seed, and these arms.
      figure_trunk=("fusion", "demo"), figure_arms=("baseline", "full_faithful")))
  if arg == "quick":
    c.study.update(seeds=(0,), num_steps=100, groups=(("fusion", "demo", MAIN_ARMS),))
    c.teachers.num_steps = 100
  elif arg == "tiny":
    c.study.update(seeds=(0,), num_steps=4, groups=(("fusion", "demo", COMPARED_ARMS),))
  return c
