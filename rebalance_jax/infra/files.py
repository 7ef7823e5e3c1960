"""Files that survive a kill: atomic writes, content-checked caches, and the workdir lock.

- `atomic_write`: readers never see a half-written file and a killed writer leaves none; the file
  gets the permissions the umask allows (as `open` would), and the rename is made durable by
  syncing the directory.
- `write_checked` / `is_intact`: a cached artifact with its SHA-256 beside it (`<file>.sha256`,
  written last), so a truncated, garbled or replaced cache file is noticed and recomputed.
- `WorkdirLock`: an exclusive `flock` on `<dir>/.lock` (or a named lock file), refused or waited
  for; the kernel drops it when its holder dies, so a killed run never leaves a stale lock.
"""

import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import IO

from rebalance_jax.infra.errors import InputError

DIGEST_SUFFIX = ".sha256"


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


_FILE_MODE = 0o666 & ~_umask()


def _sync_directory(directory: str) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
  """Calls write(f) on a temporary file beside `path`, then renames it to `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    os.fchmod(fd, _FILE_MODE)  # mkstemp creates 0600 whatever the umask
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _sync_directory(directory)


def atomic_write_text(path: str, text: str) -> None:
  atomic_write(path, lambda f: f.write(text.encode()))


def file_digest(path: str) -> str:
  """SHA-256 of the file's bytes, as hex."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def write_checked(path: str, write: Callable[[IO[bytes]], None]) -> str:
  """`atomic_write`, then the file's digest beside it; returns the digest."""
  atomic_write(path, write)
  return write_digest(path)


def write_digest(path: str) -> str:
  """Records the digest of the complete file `path` beside it (what `is_intact` checks)."""
  digest = file_digest(path)
  atomic_write_text(path + DIGEST_SUFFIX, digest + "\n")
  return digest


def recorded_digest(path: str) -> str | None:
  """The digest `write_checked` recorded beside `path`, or None if there is none."""
  try:
    with open(path + DIGEST_SUFFIX) as f:
      return f.read().strip()
  except (OSError, UnicodeDecodeError):
    return None


def is_intact(path: str) -> bool:
  """Whether `path` and its digest file exist and agree (a file written by `write_checked`)."""
  try:
    return file_digest(path) == recorded_digest(path)
  except OSError:
    return False


class WorkdirLock:
  """Holds `<directory>/<name>` exclusively while the context is open. A second holder is refused
  with an InputError naming the first (what it is, its host and pid), or with `wait` waits until
  the first is done (`on_wait` is told whom it waits for). A filesystem without locks only warns
  (see `warning`)."""

  def __init__(self, directory: str, what: str, *, name: str = ".lock", wait: bool = False,
               on_wait: Callable[[str], None] = lambda holder: None):
    self.path = os.path.join(directory, name)
    self._what, self._wait, self._on_wait = what, wait, on_wait
    self._fd = None
    self.warning = None

  def __enter__(self):
    directory = os.path.dirname(self.path)
    os.makedirs(directory, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    try:
      self._acquire(fd)
    except BlockingIOError:
      holder = _holder(fd)
      os.close(fd)
      raise InputError(f"{directory} is in use by {holder}; wait for it to finish or use another "
                       "--workdir") from None
    except OSError as e:  # e.g. a bucket mount without locks: run unlocked rather than not at all
      self.warning = f"could not lock {self.path} ({e}); make sure no other run uses this workdir"
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"what": self._what, "host": socket.gethostname(),
                              "pid": os.getpid(),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    self._fd = fd
    return self

  def _acquire(self, fd: int) -> None:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return
    except BlockingIOError:
      if not self._wait:
        raise
    self._on_wait(_holder(fd))
    while True:  # polled, not a blocking flock: a stop request is not stuck behind the holder
      time.sleep(1.0)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
      except BlockingIOError:
        continue

  def __exit__(self, *exc_info):
    os.close(self._fd)  # closing releases the lock; the file stays (removing it would race)
    self._fd = None


def lock_holder(directory: str, name: str = ".lock") -> str | None:
  """Who holds `<directory>/<name>` now (as a refusal names it), or None if nobody does."""
  try:
    fd = os.open(os.path.join(directory, name), os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return None
  except BlockingIOError:
    return _holder(fd)
  except OSError:  # a filesystem without locks: nobody can be seen holding it
    return None
  finally:
    os.close(fd)  # also releases the shared lock, if it was taken


def _holder(fd: int) -> str:
  """'a training run (pid 12, host h, since 2026-12-07 10:00:00)', from what it wrote in the lock."""
  try:
    held = json.loads(os.pread(fd, 4096, 0).decode(errors="replace"))
    return (f"a {held.get('what', 'job')} (pid {held['pid']} on {held['host']}, since "
            f"{held['since']})")
  except (ValueError, KeyError, TypeError, AttributeError):
    return "another job"
