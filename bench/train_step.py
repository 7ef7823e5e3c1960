"""Times one stage's jitted train step (compilation, steady-state steps), measures its memory and
the student's parameters, and prints the figures.

  python bench/train_step.py --config=configs/demo.py --batch_size=64 --stage=stage2 --threads=2
  python bench/train_step.py --config=configs/flickr.py --batch_size=4 --stage=stage2 \
      --threads=2 --steps=2
  python bench/train_step.py --config=configs/bench_tiny.py --batch_size=8 --stage=stage2 \
      --threads=1

Builds the stage as `recipe/phases.py` does (`stage_step.build`: random parameters, a random
host batch of the stage's global batch size, padded to config.data.max_tokens), set up as the
entry points are (`host_memory.set_up_process`: XLA:CPU's memory schedule and the huge-page heap,
whose GLIBC_TUNABLES setting the baseline command inherits, so both sides run alike). Any
--config.<field>=<value> applies.

Reports: lowering and compilation of the step (separately; the persistent compilation cache is
off), the step's model FLOPs (XLA's cost analysis) and compiled memory (arguments, outputs,
temporaries), the rate of a --gemm_size matmul on the same CPUs, the median and spread of --steps
compiled steps after --warmup steps (each blocked on), examples/s, the achieved FLOP/s and its
fraction of the matmul's rate, the process's peak RSS, the CPU time of this and of other
processes during the timed steps (this machine is shared: other processes' load slows the steps),
and the student's parameter count by top-level subtree. --baseline_command runs another
implementation's timing of the same step (the reference's harness, whose last line is JSON with
'step_sec_median_rest') first, on the same CPUs, and prints the speed and memory ratios of the one
run. --profile_ops=N traces one more step and prints the op time per part of the model (Swin
stages, text tower, fusion encoder, heads and losses, forward and backward; the optimizer update)
and the N costliest ops.

--threads=N pins the process to N CPUs (`os.sched_setaffinity`) before JAX is imported: XLA:CPU
sizes its thread pools from the CPUs it may run on, and the threads it runs cannot use more than
those N cores (compilation included). The text tower's vocabulary: --vocab_size, else the size of
config.tokenizer.vocab_file if that file exists, else config.tokenizer.vocab_size (the WordPiece
vocabulary a run trains when vocab_file is ''; its real size can be a little smaller). The
reference configs name bert-base-uncased's vocab.txt: without it, pass --vocab_size=30522.
"""

import os
import sys


def _threads_from_argv(argv: list[str]) -> int:
  """--threads=N (or --threads N) from the command line, before any flag library is imported."""
  for i, arg in enumerate(argv):
    if arg.startswith("--threads="):
      return int(arg.split("=", 1)[1])
    if arg == "--threads" and i + 1 < len(argv):
      return int(argv[i + 1])
  return 0


def _limit_threads(threads: int) -> None:
  if threads <= 0:
    return
  cpus = sorted(os.sched_getaffinity(0))
  if threads > len(cpus):
    sys.exit(f"--threads={threads}: this process may run on {len(cpus)} CPUs only ({cpus})")
  os.sched_setaffinity(0, cpus[:threads])


if "jax" in sys.modules:  # pragma: no cover - a guard for imports of this file
  sys.exit("bench/train_step.py: JAX was imported before the thread limit could be set")
_limit_threads(_threads_from_argv(sys.argv))
from rebalance_jax.infra import host_memory  # noqa: E402  (no JAX import)

host_memory.set_up_process(__file__)  # as the entry points do (cli.run_guarded)
if any(a.startswith("--profile_ops") and not a.endswith("=0") for a in sys.argv):
  # XLA:CPU reports each op it runs to the profiler only with this flag, read at start-up.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_enable_xprof_traceme=true").strip()

import collections  # noqa: E402
import dataclasses  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import stage_step  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rebalance_jax import cli  # noqa: E402
from rebalance_jax.data import text  # noqa: E402
from rebalance_jax.infra.errors import InputError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_STAGE = flags.DEFINE_string("stage", "stage2", "The stage whose objective is timed.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch size (0: the stage's).")
_THREADS = flags.DEFINE_integer("threads", 0, "Run on this many CPUs (0: all this process may).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps before them.")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "The text tower's vocabulary (0: see above).")
_GEMM = flags.DEFINE_integer("gemm_size", 2048, "The square matmul (this size, the step's "
                             "compute dtype) timed for the machine's attainable rate (0: none).")
_BASELINE = flags.DEFINE_string(
    "baseline_command", "", "A command timing the same step elsewhere (e.g. the reference "
    "implementation), run before the timed steps on the same CPUs; its last output line must be "
    "a JSON object with the median step seconds as 'step_sec_median_rest'.")
_PROFILE = flags.DEFINE_integer("profile_ops", 0, "Trace one more step and print the N costliest "
                                "XLA ops and the time per part of the model (0: no trace).")

MIB = 2**20
SUBTREES = ("image_encoder", "text_encoder", "fusion_encoder")


def vocab_size(config) -> tuple[int, str]:
  """The text tower's vocabulary size, and where it comes from."""
  if _VOCAB.value:
    return _VOCAB.value, "--vocab_size"
  vocab_file = config.tokenizer.vocab_file
  if vocab_file and os.path.isfile(os.path.expanduser(vocab_file)):
    return (text.check_vocab(os.path.expanduser(vocab_file))["size"],
            f"config.tokenizer.vocab_file={vocab_file!r}")
  if vocab_file:
    return config.tokenizer.vocab_size, (
        f"config.tokenizer.vocab_size: NOTE config.tokenizer.vocab_file={vocab_file!r} is "
        "absent; pass --vocab_size=N for its size (bert-base-uncased: 30522)")
  return config.tokenizer.vocab_size, "config.tokenizer.vocab_size"


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def tower_line(name: str, tower) -> str:
  fields = {k: v for k, v in dataclasses.asdict(tower.config).items() if k not in ("mean", "std")}
  return f"  {name}: {tower.kind} " + " ".join(f"{k}={v}" for k, v in fields.items())


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def machine_cpu_seconds() -> tuple[float, float]:
  """(busy, steal) CPU-seconds of the whole machine since boot, from /proc/stat."""
  with open("/proc/stat") as f:
    user, nice, system, _, _, irq, softirq, steal = map(int, f.readline().split()[1:9])
  hz = os.sysconf("SC_CLK_TCK")
  return (user + nice + system + irq + softirq) / hz, steal / hz


def own_cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def time_steps(compiled, state, args, warmup: int, steps: int):
  """Runs `warmup` then `steps` steps, each blocked on; returns (state, last metrics, seconds of
  each timed step, the CPU use of this and of other processes meanwhile)."""
  seconds, metrics = [], None
  for i in range(warmup + steps):
    if i == warmup:
      (busy0, steal0), own0, wall0 = machine_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    start = time.perf_counter()
    state, metrics = compiled(state, *args)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      seconds.append(time.perf_counter() - start)
  wall = time.perf_counter() - wall0
  (busy1, steal1), own = machine_cpu_seconds(), own_cpu_seconds() - own0
  if wall < 1.0:  # the counters tick every 10 ms
    return state, metrics, seconds, f"not measured ({wall:.2f} s is too short)"
  return state, metrics, seconds, (
      f"this process {own / wall:.2f} cores, other processes "
      f"{max(busy1 - busy0 - own, 0.0) / wall:.2f} cores, hypervisor steal "
      f"{(steal1 - steal0) / wall:.2f} cores")


def spread(seconds: list[float]) -> str:
  s = np.asarray(seconds)
  out = f"median {np.median(s):.4g} s, min {s.min():.4g}, max {s.max():.4g}"
  if len(s) >= 4:
    p25, p75 = np.percentile(s, [25, 75])
    out += f", p25-p75 {p25:.4g}-{p75:.4g}"
  return out


def op_names(compiled) -> dict[str, str]:
  """Each instruction of the compiled program -> the JAX name stack it came from."""
  out = {}
  for line in compiled.as_text().splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = .*metadata=\{.*?op_name=\"([^\"]+)\"", line)
    if match:
      out[match.group(1)] = match.group(2)
  return out


def part_of(name_stack: str) -> str:
  """The model part and pass an op belongs to, from its name stack."""
  if "transpose(" in name_stack:
    direction = "backward"
  elif "jvp(" in name_stack:
    direction = "forward"
  else:
    return "optimizer update and the rest"
  for pattern, part in ((r"image_encoder/(stage\d+)", r"image \1"), (r"image_encoder", "image other"),
                        (r"text_encoder", "text tower"), (r"fusion_encoder", "fusion encoder"),
                        (r"itm_head", "ITM head")):
    match = re.search(pattern, name_stack)
    if match:
      return f"{match.expand(part)} {direction}"
  return f"losses and heads {direction}"


def profile_ops(compiled, state, args, top: int):
  """Runs one step under the profiler; prints its costliest ops and the time per model part.

  XLA:CPU runs independent ops concurrently, so op times can add up to more than the step's wall
  time, and the matrix products it hands to Eigen report their dispatch, not their run (the
  profile then misses time): the shares are of the summed op time."""
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      state, metrics = compiled(state, *args)
      jax.block_until_ready((state, metrics))
    (trace,) = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(trace) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  op_seconds = collections.Counter()
  for event in events:
    op = (event.get("args") or {}).get("hlo_op")
    if event.get("ph") == "X" and op:
      op_seconds[op] += event["dur"] / 1e6
  names = op_names(compiled)
  total = sum(op_seconds.values())
  parts = collections.Counter()
  for op, seconds in op_seconds.items():
    parts[part_of(names.get(op, ""))] += seconds
  print(f"profile of one step: {total:.3f} s of op time in {len(op_seconds)} ops")
  for part, seconds in sorted(parts.items()):
    print(f"  {part:<34s} {seconds:8.3f} s {100 * seconds / total:5.1f}%")
  groups = collections.Counter()  # the same op in every block or layer of a stage, together
  for op, seconds in op_seconds.items():
    unnamed = "(no name) " + re.sub(r"[.]\d+$", "", op)
    name = re.sub(r"^jit\(train_step\)/", "", names.get(op, unnamed))
    groups[re.sub(r"(block|layer)\d+", r"\1*", name)] += seconds
  print(f"  the {top} costliest ops (one line for the same op of every block or layer):")
  for name, seconds in groups.most_common(top):
    print(f"  {seconds:8.3f} s {100 * seconds / total:5.1f}%  {name}")
  return state


def gemm_rate(size: int, dtype: str) -> float:
  """FLOP/s of a jitted size x size matmul in `dtype` (median of 10), on this process's CPUs."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  seconds = []
  for _ in range(10):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    seconds.append(time.perf_counter() - start)
  return 2 * size**3 / float(np.median(seconds))


# Runs the baseline and reports its peak RSS: from a small process of its own, as a child's peak
# RSS counts the memory of the process it was started from.
_PEAK_OF = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1], shell=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(done.returncode)")


def run_baseline(command: str) -> dict:
  """Runs `command` (a shell line) on this process's CPUs; its median step from the JSON object of
  its last output line, and its peak RSS."""
  print(f"baseline: {command}", flush=True)
  done = subprocess.run([sys.executable, "-c", _PEAK_OF, command], capture_output=True, text=True,
                        check=False)
  lines = done.stdout.strip().splitlines()
  try:
    seconds = float(json.loads(lines[-1])["step_sec_median_rest"])
  except (IndexError, ValueError, KeyError, TypeError):
    tail = (done.stderr.strip().splitlines() or lines or ["no output"])[-1]
    sys.exit(f"--baseline_command: exit status {done.returncode}; its last line has no "
             f"'step_sec_median_rest': {tail}")
  peak = int(done.stderr.strip().splitlines()[-1]) / 1024
  print(f"  median step {seconds:.4g} s, peak RSS {peak:.0f} MiB")
  return {"seconds": seconds, "peak_rss_mib": peak}


def main(argv):
  try:
    bench(argv)
  except InputError as e:
    sys.exit(f"bench/train_step.py: error: {e}")


def bench(argv):
  del argv
  if _THREADS.value != _threads_from_argv(sys.argv):
    sys.exit("--threads: give it as --threads=N or --threads N on the command line")
  jax.config.update("jax_enable_compilation_cache", False)  # compile times are compile times
  config = _CONFIG.value
  stage_name = _STAGE.value
  if stage_name not in config.stages:
    sys.exit(f"--stage={stage_name}: the config's stages are {sorted(config.stages)}")
  if _BATCH.value:
    config.stages[stage_name].batch_size = _BATCH.value
  vocab, vocab_from = vocab_size(config)
  try:
    built = stage_step.build(config, stage_name, vocab)
  except ValueError as e:
    sys.exit(str(e))
  stage, mesh, model = built.stage, built.mesh, built.model

  print(f"{stage.name} of {config_flags.get_config_filename(flags.FLAGS['config'])} at global "
        f"batch {stage.batch_size}; terms {dict(stage.objective.weights)}")
  print(f"  jax {jax.__version__}, {mesh.devices.size} {jax.default_backend()} device(s), "
        f"CPUs {sorted(os.sched_getaffinity(0))} (--threads={_THREADS.value or 'unset'}), "
        f"{len(os.listdir('/proc/self/task'))} threads before compiling")
  student = model.config
  print(tower_line("image", student.image))
  print(tower_line("text", student.text) + f" (vocab_size from {vocab_from})")
  print(f"  fusion: {' '.join(f'{k}={v}' for k, v in dataclasses.asdict(student.fusion).items())}; "
        f"embed_dim={student.embed_dim}; teacher widths {student.image_teacher_dim}, "
        f"{student.text_teacher_dim}")

  abstract_params = built.abstract_params
  total = count(abstract_params)
  heads = {k: count(v) for k, v in abstract_params.items() if k not in SUBTREES}
  print(f"parameters: {total:,} ({total / 1e6:.2f}M)")
  for name in SUBTREES:
    if name in abstract_params:
      print(f"  {name:<15s} {count(abstract_params[name]):>13,}")
  print(f"  {'heads':<15s} {sum(heads.values()):>13,}  (" +
        ", ".join(f"{k} {v:,}" for k, v in heads.items()) + ")")

  rss_before = peak_rss_mib()
  start = time.perf_counter()
  lowered = built.lower()
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  print(f"lower   {lower_s:8.2f} s")
  print(f"compile {compile_s:8.2f} s")
  rss_compile = peak_rss_mib()
  host_memory.release_free_heap()  # as loop.run_stage does after compiling
  step_flops = stage_step.flops(compiled) * mesh.devices.size  # one device's program each
  if step_flops:
    print(f"model FLOPs per step (XLA cost analysis): {step_flops / 1e12:.3f} TFLOP, "
          f"{step_flops / stage.batch_size / 1e9:.1f} GFLOP per example")
  memory = compiled.memory_analysis()
  if memory is None:
    print("memory analysis: not available on this backend")
  else:
    print(f"compiled step memory: arguments {memory.argument_size_in_bytes / MIB:.1f} MiB, "
          f"outputs {memory.output_size_in_bytes / MIB:.1f} MiB (aliased with arguments "
          f"{memory.alias_size_in_bytes / MIB:.1f} MiB), temporaries "
          f"{memory.temp_size_in_bytes / MIB:.1f} MiB")

  gemm = None
  if _GEMM.value:
    dtype = student.image.config.dtype
    gemm = gemm_rate(_GEMM.value, dtype)
    print(f"attainable rate: a {_GEMM.value}x{_GEMM.value} {dtype} matmul runs at "
          f"{gemm / 1e9:.1f} GFLOP/s here")
  baseline = run_baseline(_BASELINE.value) if _BASELINE.value else None
  if _STEPS.value <= 0:
    print("steps: none run (--steps=0)")
  else:
    state, metrics, seconds, cpu = time_steps(compiled, built.fresh_state(), built.args,
                                              _WARMUP.value, _STEPS.value)
    median = float(np.median(seconds))
    print(f"step ({len(seconds)} after {_WARMUP.value} warm-up): {spread(seconds)}")
    print(f"  {stage.batch_size / median:.2f} examples/s at the median")
    print(f"  CPU during the timed steps: {cpu}")
    if step_flops:
      rate = step_flops / median
      print(f"  achieved {rate / 1e9:.1f} GFLOP/s" + (
          f" = {rate / gemm:.0%} of the matmul's rate" if gemm else ""))
    if baseline is not None:
      print(f"  side by side: the baseline's median step {baseline['seconds']:.4g} s, peak RSS "
            f"{baseline['peak_rss_mib']:.0f} MiB: this step is {baseline['seconds'] / median:.2f}x "
            "its speed")
    if _PROFILE.value:
      state = profile_ops(compiled, state, built.args, _PROFILE.value)
    fetched = jax.device_get(metrics)
    print(f"  after step {int(state['step'])}: loss/total {float(fetched['loss/total']):.4f}, "
          f"grad_norm {float(fetched['grad_norm']):.4f}")
  print(f"peak RSS: {rss_before:.0f} MiB before compiling, {rss_compile:.0f} MiB after, "
        f"{peak_rss_mib():.0f} MiB at the end" + (
            f" ({peak_rss_mib() / baseline['peak_rss_mib']:.2f}x the baseline's)"
            if baseline else ""))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
