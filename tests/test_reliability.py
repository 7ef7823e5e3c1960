"""Reliability after a failure, below the level of a whole run: checkpoints that are damaged or
would hold NaNs, content-checked files, the workdir lock, torn metric logs, signals, and one-line
errors of the entry points."""

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO
from jax.sharding import PartitionSpec as P

from rebalance_jax import cli
from rebalance_jax.data import pipeline, text
from rebalance_jax.infra import compilation_cache, files, host_memory, interrupts, logs, sharding
from rebalance_jax.infra.errors import InputError
from rebalance_jax.training import checkpointing, loop
from rebalance_jax.training.checkpointing import (
  Checkpointer,
  ConfigMismatchError,
  DamagedCheckpointError,
)

RULES = sharding.ParamRules(((r".*", "fsdp"),), min_size=1)


def _state(seed: int):
  params = {"w": jax.random.normal(jax.random.key(seed), (16, 8)),
            "b": jnp.full((8,), seed, jnp.float32)}
  return loop.create_state(params, optax.adam(1e-3), sharding.make_mesh(fsdp=2), RULES)


def _target(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def two_checkpoints(tmp_path):
  """Steps 1 and 2 of a small sharded state, written and closed."""
  directory = str(tmp_path / "checkpoints")
  states = {1: _state(1), 2: _state(2)}
  saver = Checkpointer(directory, {"x": 1}, keep=3)
  for step, state in states.items():
    saver.save(step, state)
  saver.wait()
  saver.close()
  return directory, states


def _damage(step_dir: str, how: str, state=None) -> None:
  if how == "garbled bytes":  # same size, values changed: Orbax itself restores it silently
    raw = np.asarray(state["params"]["w"]).tobytes()[:16]  # stored uncompressed
    hits = 0
    for path in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
      with open(path, "r+b") as f:
        offset = f.read().find(raw)
        if offset >= 0:
          f.seek(offset)
          f.write(b"\xde\xad\xbe\xef")
          hits += 1
    assert hits
  elif how == "truncated file":  # every copy: Orbax reads either the merged or the per-process one
    for path in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
      os.truncate(path, os.path.getsize(path) // 3)
  elif how == "empty manifest.ocdbt":
    for path in glob.glob(f"{step_dir}/state/**/manifest.ocdbt", recursive=True):
      open(path, "w").close()
  elif how == "missing _METADATA":
    os.remove(f"{step_dir}/state/_METADATA")
  elif how == "garbled fingerprint":
    with open(f"{step_dir}/config/metadata", "w") as f:
      f.write("{not json")
  elif how == "empty step folder":
    subprocess.run(["rm", "-rf", step_dir], check=True)
    os.mkdir(step_dir)


@pytest.mark.parametrize("how", ["garbled bytes", "truncated file", "empty manifest.ocdbt",
                                 "missing _METADATA", "garbled fingerprint", "empty step folder"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(two_checkpoints, how, caplog):
  directory, states = two_checkpoints
  _damage(os.path.join(directory, "2"), how, states[2])
  loader = Checkpointer(directory, {"x": 1}, keep=3)
  step, state = loader.restore_newest(_target(states[1]))
  assert step == 1
  _assert_same(state, states[1])
  warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warnings) == 1 and f"{directory}/2 is damaged" in warnings[0]
  assert "using step 1 instead" in warnings[0]
  assert loader.all_steps() == [1]  # moved aside, not deleted:
  assert os.path.isdir(os.path.join(directory + checkpointing.DAMAGED_SUFFIX, "2"))
  loader.save(2, states[2])  # the step can be written again
  loader.wait()
  _assert_same(loader.restore(2, _target(states[2])), states[2])
  loader.close()


def test_after_a_failed_read_only_the_closed_loop_reports_are_dropped(monkeypatch):
  """A damaged checkpoint's abandoned Orbax reads each report 'Event loop is closed' (hundreds of
  tracebacks for a tiny student's checkpoint); other unraisable exceptions still reach the hook."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  assert checkpointing._attempt(lambda: 1 / 0)[1] is not None  # pylint: disable=protected-access
  report = lambda error: sys.unraisablehook(types.SimpleNamespace(exc_value=error))
  report(RuntimeError("Event loop is closed"))
  report(RuntimeError("something else"))
  report(ValueError("Event loop is closed"))
  assert [(type(u.exc_value), str(u.exc_value)) for u in seen] == [
      (RuntimeError, "something else"), (ValueError, "Event loop is closed")]


def test_every_checkpoint_damaged_is_an_error_that_moves_nothing(two_checkpoints):
  directory, states = two_checkpoints
  for step in (1, 2):
    _damage(os.path.join(directory, str(step)), "garbled fingerprint")
  loader = Checkpointer(directory, {"x": 1}, keep=3)
  with pytest.raises(DamagedCheckpointError, match=r"every checkpoint in .* is damaged \(step 2: "
                                                   r"JSONDecodeError.*; step 1: JSONDecodeError"):
    loader.restore_newest(_target(states[1]))
  assert loader.all_steps() == [1, 2]
  loader.close()


def test_another_configs_checkpoint_is_refused_not_skipped(two_checkpoints):
  directory, states = two_checkpoints
  loader = Checkpointer(directory, {"x": 2}, keep=3)
  with pytest.raises(ConfigMismatchError, match=r"checkpoint .*/2 was written by another config "
                                                r"\(x: checkpoint 1 vs config 2\)"):
    loader.restore_newest(_target(states[1]))
  with pytest.raises(ConfigMismatchError):
    loader.check_config()
  loader.close()


def test_a_non_finite_state_is_never_saved(tmp_path):
  saver = Checkpointer(str(tmp_path), {"x": 1}, keep=2)
  state = _state(1)
  state["params"]["b"] = state["params"]["b"].at[3].set(jnp.nan)
  with pytest.raises(checkpointing.NonFiniteStateError, match="step 5"):
    saver.save(5, state)
  saver.wait()
  assert saver.all_steps() == []
  saver.close()


def _quadratic_stage(tmp_path, lr_schedule, steps):
  def loss_fn(params, batch, frozen, rng):
    del batch, frozen, rng
    loss = jnp.sum(params["w"] ** 2)
    return loss, {"loss/total": loss}

  checkpointer = Checkpointer(str(tmp_path / "ckpt"), {"x": 1}, keep=5)
  stage = loop.Stage(
      name="quadratic", loss_fn=loss_fn, tx=optax.sgd(lr_schedule), schedule=lr_schedule,
      total_steps=steps, batch_size=8, batch_size_field="config.quadratic.batch_size",
      batches=pipeline.TrainBatches(64, 8, 0, lambda idx, step: {"x": idx.astype(np.float32)}),
      checkpointer=checkpointer,
      writer=logs.MetricWriter(str(tmp_path / "logs")), checkpoint_every=1, log_every=1,
      seed=0, param_rules=RULES)
  return stage


def test_parameters_that_turn_nan_are_not_saved_and_the_last_good_step_is_named(tmp_path):
  # A finite loss at every step (it is computed before the update), but the update at step 3
  # uses a NaN learning rate: the loss check alone would save the NaN state as step 3.
  schedule = lambda count: jnp.where(count < 2, 0.1, jnp.nan)
  stage = _quadratic_stage(tmp_path, schedule, steps=5)
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"quadratic: non-finite parameters or optimizer state after step 3, not "
                           r"saved\. The last checkpoint saved \(2\) holds finite values"):
    loop.run_stage(stage, {"w": jnp.ones((4,))}, None, sharding.make_mesh())
  assert stage.checkpointer.all_steps() == [1, 2]
  stage.checkpointer.close()
  stage.writer.close()


def test_each_batch_shape_compiles_once(tmp_path, caplog, monkeypatch):
  # Captions padded to length buckets: the step is compiled for each new shape, once.
  stage = _quadratic_stage(tmp_path, lambda count: 0.1, steps=6)
  stage.batches = pipeline.TrainBatches(
      64, 8, 0, lambda idx, step: {"ids": np.zeros((8, 4 + 2 * (step % 2)), np.int32)})
  trims = []
  monkeypatch.setattr(loop.host_memory, "release_free_heap", lambda: trims.append(1))
  caplog.set_level(logging.INFO)
  state = loop.run_stage(stage, {"w": jnp.ones((4,))}, None, sharding.make_mesh())
  assert int(state["step"]) == 6
  np.testing.assert_allclose(state["params"]["w"], 0.8**6, rtol=1e-6)
  compiles = [r.getMessage() for r in caplog.records if "compiling the train step" in r.message]
  assert compiles == ["quadratic: compiling the train step for captions of 4 tokens",
                      "quadratic: compiling the train step for captions of 6 tokens"]
  assert len(trims) == 2
  stage.checkpointer.close()
  stage.writer.close()


def test_the_memory_schedule_is_added_unless_xla_flags_set_it(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  host_memory.prefer_memory_schedule()
  assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                     "--xla_cpu_enable_concurrency_optimized_scheduler=false")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=true")
  host_memory.prefer_memory_schedule()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"
  host_memory.release_free_heap()  # glibc's malloc_trim here; harmless


def test_nan_at_the_first_save_says_no_checkpoint_was_written(tmp_path):
  stage = _quadratic_stage(tmp_path, lambda count: jnp.nan, steps=2)
  with pytest.raises(loop.NonFiniteLossError, match="No checkpoint of this phase was written"):
    loop.run_stage(stage, {"w": jnp.ones((4,))}, None, sharding.make_mesh())
  stage.checkpointer.close()
  stage.writer.close()


def test_a_torn_last_metrics_line_is_dropped_and_others_are_errors(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
  writer = logs.MetricWriter(str(tmp_path))
  writer.start(2)
  writer.write(3, {"loss": 0.3})
  writer.close()
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
  path.write_text('{"step": 1}\ngarbage\n{"step": 2}\n')
  with pytest.raises(InputError, match=r"metrics\.jsonl:2 is not a metrics record"):
    logs.MetricWriter(str(tmp_path)).start(2)


def test_atomic_writes_follow_the_umask(tmp_path):
  files.atomic_write_text(str(tmp_path / "a.txt"), "x")
  mask = os.umask(0)
  os.umask(mask)
  assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == 0o666 & ~mask


def test_checked_files_notice_any_change(tmp_path):
  path = str(tmp_path / "f.bin")
  files.write_checked(path, lambda f: f.write(b"abcdef"))
  assert files.is_intact(path)
  with open(path, "r+b") as f:
    f.write(b"x")
  assert not files.is_intact(path)
  os.remove(path + files.DIGEST_SUFFIX)
  assert not files.is_intact(path)


def test_the_workdir_lock_refuses_a_second_holder_and_dies_with_its_holder(tmp_path):
  with files.WorkdirLock(str(tmp_path), "training run"):
    # The refusal names the holder, not the job refused.
    with pytest.raises(InputError, match=rf"is in use by a training run \(pid {os.getpid()} on "
                                         r".*, since .*\); wait for it"):
      files.WorkdirLock(str(tmp_path), "teacher-feature job").__enter__()
  with files.WorkdirLock(str(tmp_path), "training run"):  # released on exit
    pass
  # A holder killed with -9 leaves the file but not the lock.
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; sys.path.insert(0, sys.argv[1]); from rebalance_jax.infra import files; "
      "lock = files.WorkdirLock(sys.argv[2], 'x').__enter__(); print('held', flush=True); "
      "time.sleep(60)"), REPO, str(tmp_path)], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(InputError, match="in use"):
    files.WorkdirLock(str(tmp_path), "training run").__enter__()
  holder.kill()
  holder.wait()
  with files.WorkdirLock(str(tmp_path), "training run"):
    pass


def test_a_waiting_lock_takes_over_when_its_holder_is_done(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys; sys.path.insert(0, sys.argv[1]); from rebalance_jax.infra import files; "
      "files.WorkdirLock(sys.argv[2], 'preparation of coco', name='.d.lock').__enter__(); "
      "print('held', flush=True); sys.stdin.readline()"), REPO, str(tmp_path)],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  waited = []

  def release(described):  # told once it found the lock held: now let the holder finish
    waited.append(described)
    holder.stdin.write("\n")
    holder.stdin.flush()

  with files.WorkdirLock(str(tmp_path), "preparation of coco", name=".d.lock", wait=True,
                         on_wait=release):
    assert holder.wait(timeout=30) == 0
  assert len(waited) == 1 and waited[0].startswith(f"a preparation of coco (pid {holder.pid} on ")


def test_signals_become_a_stop_request_and_exit_codes(monkeypatch):
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  with interrupts.catching():
    assert interrupts.requested() is None
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
    with pytest.raises(interrupts.Interrupted, match="SIGINT: stopped during evaluation") as e:
      interrupts.check("evaluation")
    assert e.value.exit_code == 130
  # The handlers are what they were (a job started in the background may ignore SIGINT).
  assert {s: signal.getsignal(s) for s in before} == before
  monkeypatch.setattr(cli.distributed, "start", lambda argv: None)
  for error, code in [(interrupts.Interrupted(signal.SIGTERM, "stopped"), 143),
                      (interrupts.Interrupted(signal.SIGINT, "stopped"), 130),
                      (KeyboardInterrupt(), 130), (InputError("bad"), "rebalance_jax.x: error: bad")]:
    def work(error=error):
      raise error
    with pytest.raises(SystemExit) as stopped:
      cli.run_guarded("rebalance_jax.x", ["x"], work)
    assert stopped.value.code == code


@pytest.mark.parametrize("content, match", [
    ("", r"lacks the special tokens \['\[PAD\]'"),
    ("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\ndog\ndog\n", "empty or repeated lines"),
    (b"\xff\xfe[PAD]", "is unreadable"),
])
def test_a_bad_vocabulary_file_is_named(tmp_path, content, match):
  path = tmp_path / "vocab.txt"
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(InputError, match=rf"tokenizer vocabulary {path}.*{match}"):
    text.load_tokenizer(str(path))


def test_the_best_checkpoint_is_kept_besides_the_newest(tmp_path):
  saver = Checkpointer(str(tmp_path), {"x": 1}, keep=2, best_metric="r_mean")
  state = _state(1)
  for step, score in [(1, 1.0), (2, 3.0), (3, 2.0), (4, 3.0), (5, 0.5)]:
    saver.save(step, state, {"r_mean": score, "rsum": 6 * score})
    saver.wait()
  saver.save(6, state)  # a periodic checkpoint without metrics
  saver.wait()
  assert saver.all_steps() == [2, 5, 6]  # the newest two, and the best (the tie: the earlier)
  assert saver.best_step() == 2 and saver.metrics(2) == {"r_mean": 3.0, "rsum": 18.0, "step": 2}
  saver.close()
  reopened = Checkpointer(str(tmp_path), {"x": 1}, keep=2, best_metric="r_mean", read_only=True)
  assert reopened.best_step() == 2
  params = reopened.restore(2, {"params": _target(state)["params"]}, partial=True)
  assert set(params) == {"params"}
  _assert_same(params["params"], state["params"])
  reopened.close()


@pytest.mark.parametrize("looped", [True, False])
def test_the_cache_guard_spots_collectives_inside_loops(looped):
  """The executables XLA:CPU cannot load from the persistent cache (infra/compilation_cache.py)."""
  mesh = sharding.make_mesh()
  ring = [(i, (i + 1) % 8) for i in range(8)]

  def local(x):
    step = lambda _, y: jax.lax.ppermute(y, "data", ring)
    return jax.lax.fori_loop(0, 3, step, x) if looped else step(0, x)

  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  executable = fn.lower(jnp.ones((8, 4))).compile().runtime_executable()
  assert compilation_cache.collective_in_nested_computation(executable) == looped


def test_the_huge_page_restart_reexecutes_the_same_command_once(monkeypatch):
  execs = []
  monkeypatch.setattr(host_memory.os, "execv", lambda path, argv: execs.append((path, argv)))
  monkeypatch.setattr(host_memory, "_huge_pages_would_help", lambda: True)
  command = ["python", "-W", "ignore", "-m", "rebalance_jax.train", "--config=configs/demo.py"]
  monkeypatch.setattr(host_memory.sys, "orig_argv", command)
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
  host_memory.restart_with_huge_page_heap("rebalance_jax.evaluate")  # not how it was started
  assert execs == []
  host_memory.restart_with_huge_page_heap("rebalance_jax.train")
  assert execs == [(sys.executable, [sys.executable, *command[1:]])]
  assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  host_memory.restart_with_huge_page_heap("rebalance_jax.train")  # the restarted process
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the user's opt-out
  host_memory.restart_with_huge_page_heap("rebalance_jax.train")
  assert len(execs) == 1
  script = os.path.join(REPO, "bench", "train_step.py")
  monkeypatch.setattr(host_memory.sys, "orig_argv", ["python", script, "--threads=2"])
  monkeypatch.delenv("GLIBC_TUNABLES")
  host_memory.restart_with_huge_page_heap(script)
  assert execs[-1] == (sys.executable, [sys.executable, script, "--threads=2"])
