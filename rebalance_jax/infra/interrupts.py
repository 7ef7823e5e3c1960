"""Graceful stops: SIGTERM (preemption, `scancel`, `kill`) and Ctrl-C in every phase of a run.

While `catching()` is open, both signals only set a flag. The train loop looks at it after every
step (it checkpoints, then stops); other phases call `check()` at safe points (between phases,
between evaluation batches), which abandons the phase by raising `Interrupted`. Nothing is ever
half-written: every file is written atomically and checkpoints are awaited. The entry points exit
with 128 + the signal's number (143 for SIGTERM, 130 for Ctrl-C), so schedulers rerun the job.
A second Ctrl-C stops at once (KeyboardInterrupt).

With several processes JAX's distributed runtime owns SIGTERM (its preemption sync point makes all
processes stop at the same step), and no handler is installed here: a flag set in one process only
would make the processes leave their collectives at different points.
"""

import contextlib
import signal
import threading

import jax

_requested: list[int] = []  # signal numbers received while catching
_deferring: list[bool] = []  # non-empty while `deferred()` is open
_catching: list[bool] = []  # non-empty while the outermost `catching()` is open


class Interrupted(Exception):
  """A stop was requested by a signal; what was finished is saved. Re-run to continue."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum
    self.exit_code = 128 + signum


def _request(signum, frame):
  del frame
  if signum == signal.SIGINT and signal.SIGINT in _requested:
    raise KeyboardInterrupt
  _requested.append(signum)


@contextlib.contextmanager
def catching():
  """Turns SIGTERM and SIGINT into a stop request while open (single process, main thread).
  Nested inside another `catching()` (a driver running several runs) it leaves the outer one's
  handlers and requests in place, so a stop between two runs is not lost."""
  if (jax.process_count() > 1 or threading.current_thread() is not threading.main_thread() or
      _catching):
    yield
    return
  _catching.append(True)
  _requested.clear()
  previous = {s: signal.signal(s, _request) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _requested.clear()
    _catching.pop()


def requested() -> int | None:
  """The first signal received while catching, or None."""
  return _requested[0] if _requested else None


@contextlib.contextmanager
def deferred():
  """`check` does not raise while open: for work whose result the caller saves before stopping
  (an evaluation whose metrics go into the checkpoint)."""
  _deferring.append(True)
  try:
    yield
  finally:
    _deferring.pop()


def check(where: str) -> None:
  """Raises Interrupted if a stop was requested (outside `deferred`); `where` names the abandoned
  phase."""
  signum = requested()
  if signum is not None and not _deferring:
    raise Interrupted(signum, f"{signal.Signals(signum).name}: stopped during {where}; finished "
                              "phases and checkpoints are saved, re-run the same command to resume")
