"""Evaluation results as JSON, a paper-shaped markdown table, and PNG plots."""

import json
import os

import matplotlib
import numpy as np

from rebalance_jax.infra.files import atomic_write, atomic_write_text

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt  # noqa: E402

RECALL_COLUMNS = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["rsum"]
NDCG_PROTOCOLS = ("i2i", "t2t", "mixed", "mixed_faithful")
NDCG_KS = (10, 20, 50)
NDCG_COLUMNS = [f"{p}_ndcg@{k}" for p in NDCG_PROTOCOLS for k in NDCG_KS]


def column_header(column: str) -> str:
  if column in NDCG_COLUMNS:
    protocol, k = column.split("_ndcg@")
    return f"{protocol.replace('_faithful', ' (faithful)')} N@{k}"
  return column.replace("_r", " R@")


def _model_cell(name: str, metrics: dict) -> str:
  """'<name> (<score mode>)', then the evaluated checkpoint and how it was selected."""
  cell = f"{name} ({metrics.get('score_mode', 'itc')})"
  if "checkpoint_step" in metrics:
    cell += f", step {metrics['checkpoint_step']}: {metrics['selected_by']}"
  return cell


def results_table(rows: dict[str, dict]) -> str:
  """Markdown: one row per model; i2t/t2i R@1/5/10, rsum, then NDCG@10/20/50 of each protocol."""
  columns = RECALL_COLUMNS + [c for c in NDCG_COLUMNS if any(c in m for m in rows.values())]
  header = ["model"] + [column_header(c) for c in columns]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, metrics in rows.items():
    cells = [f"{metrics[c]:.2f}" if c in metrics else "" for c in columns]
    lines.append("| " + " | ".join([_model_cell(name, metrics)] + cells) + " |")
  return "\n".join(lines)


def results_figure(rows: dict[str, dict], curves: dict[str, dict]) -> plt.Figure:
  """Recall@K curves (`retrieval.recall_curves`) and NDCG@K bars per protocol, one colour per model.

  A model's ITC cosine curve spans every K (solid); its ITM re-ranked curve (dashed) stops at the
  candidate count max_k, past which the re-ranked recall is an artifact of the tie rule.
  """
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for index, (name, curve) in enumerate(curves.items()):
    lines = [(curve["itc"], "-", f"{name}: ITC cosine")]
    if "itm" in curve:
      lines.append((curve["itm"], "--", f"{name}: ITM re-ranked (K ≤ {curve['itm']['max_k']})"))
    for ax, direction in zip(axes[:2], ("i2t", "t2i")):
      for recall, style, label in lines:
        ax.plot(curve["ks"][:len(recall[direction])], recall[direction], style, color=f"C{index}",
                label=label)
  for ax, direction in zip(axes[:2], ("i2t", "t2i")):
    ax.set(title=f"{direction} recall@K", xlabel="K", ylabel="recall (%)", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  width = 0.8 / max(len(rows), 1)
  positions = np.arange(len(NDCG_COLUMNS))
  for i, (name, metrics) in enumerate(rows.items()):
    axes[2].bar(positions + i * width, [metrics.get(c, 0.0) for c in NDCG_COLUMNS], width,
                color=f"C{i}", label=name)
  axes[2].set_xticks(positions + width * (len(rows) - 1) / 2,
                     [column_header(c) for c in NDCG_COLUMNS], rotation=60, ha="right", fontsize=8)
  axes[2].set(title="NDCG@K (ROUGE-L relevance)", ylabel="NDCG × 100")
  axes[2].legend()
  fig.tight_layout()
  return fig


def plot_results(rows: dict[str, dict], curves: dict[str, dict], path) -> None:
  """Writes `results_figure` as a PNG to `path` (a file name or a binary file)."""
  fig = results_figure(rows, curves)
  fig.savefig(path, dpi=100, format="png")
  plt.close(fig)


def write_results(directory: str, rows: dict[str, dict], curves: dict[str, dict]) -> str:
  """Writes results.json ({"metrics": rows, "recall_curves": curves}, a model's curves as
  `retrieval.recall_curves` returns them), results.md and results.png to `directory`; returns the
  table."""
  table = results_table(rows)
  atomic_write_text(os.path.join(directory, "results.json"),
                    json.dumps({"metrics": rows, "recall_curves": curves}, indent=1))
  atomic_write_text(os.path.join(directory, "results.md"), table + "\n")
  atomic_write(os.path.join(directory, "results.png"),
               lambda f: plot_results(rows, curves, f))
  return table
