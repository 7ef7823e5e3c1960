"""Runs a command as N local JAX processes (CPU devices, loopback coordinator): a multi-host job on
one machine, for tests and for trying multi-process runs without a cluster.

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      -m rebalance_jax.train --config=configs/demo.py:tiny --workdir=runs/mp

Everything after `--` is passed to `python` in every process, followed by --coordinator_address,
--num_processes and --process_id. Every process's output is written to <log_dir>/process_<i>.log;
process 0's is printed when the job ends. Exits with the first non-zero exit code, after stopping the
other processes; a process still running after --timeout seconds is stopped too.
"""

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(command: list[str], num_processes: int, devices_per_process: int, log_dir: str,
           timeout: float) -> int:
  os.makedirs(log_dir, exist_ok=True)
  address = f"127.0.0.1:{free_port()}"
  # The caller's XLA flags are kept; only the device count is this launcher's.
  inherited = [f for f in os.environ.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(
      inherited + [f"--xla_force_host_platform_device_count={devices_per_process}"])}
  processes, logs = [], []
  for i in range(num_processes):
    logs.append(open(os.path.join(log_dir, f"process_{i}.log"), "w"))
    args = [sys.executable, *command, f"--coordinator_address={address}",
            f"--num_processes={num_processes}", f"--process_id={i}"]
    processes.append(subprocess.Popen(args, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout
  status = 0
  while status == 0 and any(p.poll() is None for p in processes):
    if time.monotonic() > deadline:
      print(f"launch/local.py: timeout after {timeout:.0f} s", file=sys.stderr)
      status = 124
    time.sleep(0.2)
    status = status or next((p.returncode for p in processes if p.returncode), 0)
  for p in processes:
    if p.poll() is None:
      p.kill()
    p.wait()
    status = status or p.returncode
  for log in logs:
    log.close()
  with open(os.path.join(log_dir, "process_0.log")) as f:
    sys.stdout.write(f.read())
  return status


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--log_dir", default="runs/local_launch_logs")
  parser.add_argument("--timeout", type=float, default=3600)
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the python arguments to run after --")
  sys.exit(launch(command, args.num_processes, args.devices_per_process, args.log_dir,
                  args.timeout))


if __name__ == "__main__":
  main()
