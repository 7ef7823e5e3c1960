"""Metrics as JSON lines and TensorBoard events, and progress lines with an ETA (process 0 only)."""

import json
import logging as python_logging
import os
import time

import jax
import numpy as np
from absl import logging
from tensorboardX import SummaryWriter


def quiet_library_logs() -> None:
  """Hides Orbax's per-save INFO lines (it logs through absl); warnings and errors still show."""
  def keep(record):
    return record.levelno >= python_logging.WARNING or "/orbax/" not in record.pathname
  python_logging.getLogger("absl").addFilter(keep)


def is_main_process() -> bool:
  return jax.process_index() == 0


class MetricWriter:
  """Writes scalar metrics to <logdir>/metrics.jsonl and TensorBoard event files."""

  def __init__(self, logdir: str):
    self._enabled = is_main_process()
    if self._enabled:
      os.makedirs(logdir, exist_ok=True)
      self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")
      self._tb = SummaryWriter(logdir)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self._enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tb.close()


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Logs `name step/total (pct) | key metrics | rate | ETA`, timing from the first report."""

  def __init__(self, name: str, total_steps: int, first_step: int):
    self.name, self.total = name, total_steps
    self._start_step, self._start_time = first_step, None

  def report(self, step: int, metrics: dict[str, float], examples_per_step: int) -> dict:
    """Logs a line and returns the throughput metrics it computed."""
    now = time.perf_counter()
    if self._start_time is None:  # the first interval includes compilation: restart the clock
      self._start_step, self._start_time = step, now
      rate = float("nan")
    else:
      rate = (step - self._start_step) / max(now - self._start_time, 1e-9)
    eta = format_duration((self.total - step) / rate) if rate > 0 else "?"
    shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items()
                     if k.startswith("loss/") or k.startswith("scalars/"))
    if is_main_process():
      logging.info("%s %d/%d (%.0f%%) | %s | %.1f ex/s | ETA %s", self.name, step, self.total,
                   100.0 * step / self.total, shown, rate * examples_per_step, eta)
    return {"perf/examples_per_sec": rate * examples_per_step} if np.isfinite(rate) else {}
