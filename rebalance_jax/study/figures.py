"""The ablation report's figures, each written as a PNG: the relation matrices of one batch, the
training trajectories of one trunk, the metrics of the main group over seeds, and the PCA of the
test embeddings of the figure arms."""

import json
import os

import matplotlib
import numpy as np

from rebalance_jax.evaluators.results import NDCG_KS, NDCG_PROTOCOLS
from rebalance_jax.infra import logs
from rebalance_jax.infra.files import atomic_write
from rebalance_jax.study import grid

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt  # noqa: E402

DPI = 110
RELATIONS = ("R_V", "R_T", "R_E", "R_M_before", "R_M_after")
SCALARS = (("scalars/lam", "λ"), ("scalars/temp", "τ"), ("scalars/temp2", "τ2"))
DISTILLATION_SCALARS = ("scalars/lam", "scalars/temp2")
COUNT_PREFIX = "count="
MARKED_ATTRIBUTE = "colour=red"  # the PCA's second row: is a red object in the scene?


def mean_std(values) -> tuple[float, float]:
  """Mean and standard deviation over seeds (ddof=1 when there are several, else 0)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else 0.0)


def _save(fig: plt.Figure, path: str) -> str:
  atomic_write(path, lambda f: fig.savefig(f, dpi=DPI, format="png"))
  plt.close(fig)
  return path


def relation_heatmaps(probes: dict, path: str) -> str:
  """R^V, R^T, the fused target R^E (with λ and τ2), and the student's R^M at stage 1 and after
  the full arm, on one colour scale."""
  matrices = [np.asarray(probes[f"relation/{key}"]) for key in RELATIONS]
  vmin, vmax = min(m.min() for m in matrices), max(m.max() for m in matrices)
  titles = ["$R^V$: teacher image", "$R^T$: teacher text",
            f"$R^E$: fused target\nλ = {float(probes['relation/lam']):.3g}, "
            f"τ2 = {float(probes['relation/tau2']):.3g}",
            "$R^M$: student, stage 1", f"$R^M$: student, after {probes['relation/arm']}"]
  fig, axes = plt.subplots(1, len(RELATIONS), figsize=(3.6 * len(RELATIONS), 4),
                           layout="constrained")
  for ax, matrix, title in zip(axes, matrices, titles):
    image = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap="viridis")
    ax.set(title=title, xlabel="batch item", ylabel="batch item")
  fig.colorbar(image, ax=axes, shrink=0.8, label="relation")
  return _save(fig, path)


def read_log(path: str) -> list[dict]:
  """A metrics.jsonl's records by step, the last of each step kept (a resume repeats steps)."""
  by_step = {}
  for line in logs.read_records(path):
    record = json.loads(line)
    by_step[record["step"]] = record
  return [by_step[step] for step in sorted(by_step)]


def _series(log: list[dict], key: str, offset: int) -> tuple[list[int], list[float]]:
  points = [(r["step"] + offset, r[key]) for r in log if key in r]
  return [s for s, _ in points], [v for _, v in points]


def trajectories(workdir: str, trunk: str, arms, path: str) -> str:
  """λ, τ, τ2 and every loss term against the total step: stage 1, then each arm from stage 1's
  last step (`trunk`: the trunk's directory under `workdir`)."""
  logs_of = lambda stage: read_log(os.path.join(workdir, trunk, stage, "logs", "metrics.jsonl"))
  logs = {grid.FIRST_STAGE: logs_of(grid.FIRST_STAGE), **{arm: logs_of(arm) for arm in arms}}
  offset = logs[grid.FIRST_STAGE][-1]["step"]
  keys = {k for log in logs.values() for r in log for k in r}
  quantities = [(k, title) for k, title in SCALARS if k in keys]
  quantities += [(k, k) for k in sorted(keys) if k.startswith("loss/")]
  columns = min(4, len(quantities))
  rows = -(-len(quantities) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
  for ax, (key, title) in zip(axes.flat, quantities):
    for index, (stage, log) in enumerate(logs.items()):
      if key in DISTILLATION_SCALARS and not any("loss/kd" in r for r in log):
        continue  # a stage without the relation loss never reads λ, τ2 (weight decay moves them)
      steps, values = _series(log, key, 0 if stage == grid.FIRST_STAGE else offset)
      if steps:
        ax.plot(steps, values, color="black" if index == 0 else f"C{index - 1}", label=stage)
    ax.axvline(offset, color="grey", linestyle=":", linewidth=1)
    ax.set(title=title, xlabel="total step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in axes.flat[len(quantities):]:
    ax.set_visible(False)
  fig.suptitle(f"{trunk}: training trajectories (dotted: end of stage 1)")
  fig.tight_layout()
  return _save(fig, path)


def _main_group(records: list[dict]) -> tuple[str, str]:
  return records[0]["student"], records[0]["level"]


def metric_curves(records: list[dict], curves_by_run: dict, path: str) -> str:
  """For each arm of the main group (the first record's student and level): NDCG@K of each
  protocol, mean ± std over seeds, and the ITC cosine recall@K curves, mean over seeds.
  `curves_by_run[(trunk, arm)]` is the run's `retrieval.recall_curves`."""
  group = _main_group(records)
  by_arm = {}
  for r in records:
    if (r["student"], r["level"]) == group:
      by_arm.setdefault(r["arm"], []).append(r)
  fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
  ndcg_axes, recall_axes = axes.flat[:len(NDCG_PROTOCOLS)], axes.flat[len(NDCG_PROTOCOLS):]
  for index, (arm, runs) in enumerate(by_arm.items()):
    for ax, protocol in zip(ndcg_axes, NDCG_PROTOCOLS):
      stats = [mean_std([r["metrics"][f"{protocol}_ndcg@{k}"] for r in runs]) for k in NDCG_KS]
      ax.errorbar(NDCG_KS, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                  capsize=3, color=f"C{index}", label=arm)
    curves = [curves_by_run[(r["trunk"], arm)] for r in runs]
    for ax, direction in zip(recall_axes, ("i2t", "t2i")):
      recall = np.mean([c["itc"][direction] for c in curves], axis=0)
      ax.plot(curves[0]["ks"], recall, color=f"C{index}", label=arm)
  for ax, protocol in zip(ndcg_axes, NDCG_PROTOCOLS):
    ax.set(title=f"{protocol.replace('_faithful', ' (faithful)')} NDCG@K", xlabel="K",
           ylabel="NDCG × 100", xticks=NDCG_KS)
  for ax, direction in zip(recall_axes, ("i2t", "t2i")):
    ax.set(title=f"{direction} recall@K (ITC cosine)", xlabel="K", ylabel="recall (%)",
           ylim=(0, 100))
  for ax in axes.flat:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  n = max(len(runs) for runs in by_arm.values())
  fig.suptitle(f"{group[0]} / {group[1]}: mean over seeds (n = {n}; error bars: std)")
  fig.tight_layout()
  return _save(fig, path)


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The rows of `x` on their first two principal axes, and the fraction of variance of each."""
  centred = x - x.mean(axis=0)
  _, singular, axes = np.linalg.svd(centred, full_matrices=False)
  variance = singular**2 / max(float(np.sum(singular**2)), 1e-12)
  return centred @ axes[:2].T, variance[:2]


def _variance_text(variance: np.ndarray) -> str:
  return f"PC 1-2: {100 * variance[0]:.0f}% + {100 * variance[1]:.0f}% of variance"


def _scatter(ax, points: np.ndarray, classes: list[tuple[str, np.ndarray]], title: str) -> None:
  for index, (label, mask) in enumerate(classes):
    ax.scatter(points[mask, 0], points[mask, 1], s=12, alpha=0.7, color=f"C{index}", label=label)
  ax.set(title=title, xlabel="PC 1", ylabel="PC 2")
  ax.legend(fontsize=7, markerscale=1.5)


def embedding_pca(probes: dict, path: str) -> str:
  """Per figure arm (a column; PCA fitted on that arm's embeddings): its test image embeddings
  coloured by object count, then by whether a red object is present, and its caption embeddings
  coloured by their image's object count."""
  names = [str(n) for n in probes["attribute_names"]]
  attributes = np.asarray(probes["attributes"]).astype(bool)
  counts = [(name, attributes[:, i]) for i, name in enumerate(names)
            if name.startswith(COUNT_PREFIX)]
  marked = attributes[:, names.index(MARKED_ATTRIBUTE)]
  marked_classes = [(f"without {MARKED_ATTRIBUTE}", ~marked), (f"with {MARKED_ATTRIBUTE}", marked)]
  caption_image = np.asarray(probes["caption_image"])
  arms = [str(a) for a in probes["arms"]]
  fig, axes = plt.subplots(3, len(arms), figsize=(4.5 * len(arms), 12.5), squeeze=False)
  for column, arm in zip(axes.T, arms):
    images, image_var = pca_2d(np.asarray(probes[f"embedding/{arm}/image"], np.float64))
    texts, text_var = pca_2d(np.asarray(probes[f"embedding/{arm}/text"], np.float64))
    _scatter(column[0], images, counts, f"{arm}: images by count\n{_variance_text(image_var)}")
    _scatter(column[1], images, marked_classes,
             f"{arm}: images by {MARKED_ATTRIBUTE}\n{_variance_text(image_var)}")
    _scatter(column[2], texts, [(name, mask[caption_image]) for name, mask in counts],
             f"{arm}: captions by their image's count\n{_variance_text(text_var)}")
  fig.tight_layout()
  return _save(fig, path)
