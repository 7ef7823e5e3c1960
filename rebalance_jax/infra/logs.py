"""Metrics as JSON lines and TensorBoard events, and progress lines with an ETA (process 0 only)."""

import json
import logging as python_logging
import os
import re
import sys
import time

import jax
import numpy as np
from absl import logging
from tensorboardX import SummaryWriter

from rebalance_jax.infra.errors import InputError
from rebalance_jax.infra.files import atomic_write_text


def quiet_library_logs() -> None:
  """Hides Orbax's per-save INFO lines (it logs through absl), its warning on every periodic
  checkpoint saved without selection metrics, and JAX's note on each accelerator backend it does
  not find; other warnings and errors still show, Orbax's and asyncio's (Orbax's abandoned
  writes) as one line each, without the traceback that each of its threads would print."""
  def keep(record):
    if "/orbax/" not in record.pathname:
      return True
    record.exc_info = record.exc_text = None
    return (record.levelno >= python_logging.WARNING and
            not str(record.msg).startswith("Requested `tracked_metric`"))

  def one_line(record):
    record.exc_info = record.exc_text = None
    return True
  python_logging.getLogger("absl").addFilter(keep)
  python_logging.getLogger("asyncio").addFilter(one_line)
  drop_closed_loop_reports()


def drop_closed_loop_reports() -> None:
  """Orbax reads and writes a checkpoint's arrays concurrently on an asyncio loop that it closes as
  soon as one of them fails; every other one then reports, as an unraisable exception, that the
  loop it answers to is closed: hundreds of tracebacks for one damaged checkpoint or full disk,
  whose error is reported once where it is caught. This process drops exactly those reports."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_reports", False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and
            str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_closed_loop_reports = True
  sys.unraisablehook = hook
  python_logging.getLogger("jax._src.xla_bridge").addFilter(
      lambda r: r.levelno >= python_logging.WARNING or
      not str(r.msg).startswith("Unable to initialize backend"))


def is_main_process() -> bool:
  return jax.process_index() == 0


class MetricWriter:
  """Writes scalar metrics to <logdir>/metrics.jsonl and TensorBoard event files.

  `start(step)` opens them for a run that starts (or resumes) at `step`: records of later steps,
  written before an interruption, are dropped from both, so a resumed run logs each step once.
  """

  def __init__(self, logdir: str):
    self._logdir = logdir
    self._enabled = is_main_process()
    self._jsonl = self._tb = None

  def start(self, step: int) -> None:
    if not self._enabled:
      return
    path = os.path.join(self._logdir, "metrics.jsonl")
    if os.path.exists(path):
      atomic_write_text(path, "".join(line for line in read_records(path) if
                                      json.loads(line)["step"] <= step))
    os.makedirs(self._logdir, exist_ok=True)
    self._jsonl = open(path, "a")
    self._tb = SummaryWriter(self._logdir, purge_step=step + 1 if step else None)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self._enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(tensorboard_name(name), value, step)
    self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()


def tensorboard_name(name: str) -> str:
  """A metric's name as TensorBoard accepts it (letters, digits, '_', '-', '.', '/'):
  'itm/i2t_ndcg@10' -> 'itm/i2t_ndcg_10'. metrics.jsonl keeps the name as it is."""
  return re.sub(r"[^\w./-]", "_", name)


def read_records(path: str) -> list[str]:
  """The JSON lines of a metrics file; a torn last line (a kill while writing it) is dropped, any
  other unreadable line is an InputError naming it."""
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = [line.rstrip("\n") + "\n" for line in f if line.strip()]
  for number, line in enumerate(lines, 1):
    try:
      json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      if number < len(lines):
        raise InputError(f"{path}:{number} is not a metrics record; repair or delete the "
                         "file") from None
      logging.warning("%s: dropping the torn last line %d", path, number)
      return lines[:-1]
  return lines


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Logs `name step/total (pct) | key metrics | rate | ETA`, timing from the first report (whose
  line has no rate: its interval includes compilation)."""

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
    shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items()
                     if k.startswith("loss/") or k.startswith("scalars/"))
    parts = [f"{self.name} {step}/{self.total} ({100.0 * step / self.total:.0f}%)", shown]
    if rate > 0:
      parts += [f"{rate * examples_per_step:.1f} ex/s",
                f"ETA {format_duration((self.total - step) / rate)}"]
    if is_main_process():
      logging.info("%s", " | ".join(p for p in parts if p))
    return {"perf/examples_per_sec": rate * examples_per_step} if np.isfinite(rate) else {}
