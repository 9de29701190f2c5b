r"""Starts a launcher as several JAX processes on this machine, each with its own CPU devices.

A try of the multi-process set-up without a cluster: every process gets
``--xla_force_host_platform_device_count=<devices_per_process>`` and the flags of
``experiments/distributed.py`` (``--coordinator=localhost:<a free port> --num_processes=N
--process_id=I``), so that ``jax.devices()`` lists N x devices_per_process devices, of which
each process owns its own. The processes' output is printed line by line, each line prefixed
with its process's index.

  python experiments/launch_local.py --num_processes 2 --devices_per_process 4 -- \
      experiments/benchmark_sharded.py --quick --out_dir /tmp/sharded_2x4

The launcher waits for every process (a process that dies takes the others down within their
heartbeat timeout, see distributed.py) and exits with the first failure's code: a process's
non-zero exit status, 128 + N for one killed by signal N, or 124 when ``--timeout`` ran out and
the processes still running were killed. ``--summary`` writes each process's exit status and
seconds to a JSON file.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\d+")


def free_port():
  """A TCP port that nothing listens on now (the operating system's choice)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(devices_per_process, env=None):
  """The environment of one process: XLA_FLAGS with this device count, whatever it had."""
  env = dict(os.environ if env is None else env)
  xla_flags = DEVICE_COUNT.sub("", env.get("XLA_FLAGS", "")).split()
  xla_flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  env["XLA_FLAGS"] = " ".join(xla_flags)
  return env


def _relay(stream, prefix, out):
  for line in stream:
    out.write(prefix + line)
    out.flush()


def exit_code(returncode):
  """A shell's exit status for a child's: 128 + N for one killed by signal N."""
  return 128 - returncode if returncode < 0 else returncode


def launch(argv, num_processes, devices_per_process, timeout=None, port=None):
  """Runs ``python argv ...`` as ``num_processes`` processes; waits for all of them.

  Returns:
    ``(code, summary)``: the first failure's exit code (0 when all succeeded) and one dict per
    process, ``{"process_id", "returncode", "seconds"}`` (seconds from the start to its exit).
  """
  port = port or free_port()
  env = process_env(devices_per_process)
  start = time.monotonic()
  procs, relays = [], []
  for i in range(num_processes):
    command = [sys.executable, *argv]
    if num_processes > 1:  # one process runs as it would without the launcher
      command += [f"--coordinator=localhost:{port}", f"--num_processes={num_processes}",
                  f"--process_id={i}"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1)
    procs.append(proc)
    for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
      relay = threading.Thread(target=_relay, args=(stream, f"[{i}] ", out), daemon=True)
      relay.start()
      relays.append(relay)
  ended = [None] * num_processes
  timed_out = False
  while any(t is None for t in ended):
    for i, proc in enumerate(procs):
      if ended[i] is None and proc.poll() is not None:
        ended[i] = time.monotonic() - start
    if timeout is not None and time.monotonic() - start > timeout and not timed_out:
      timed_out = True
      for proc in procs:
        if proc.poll() is None:
          proc.kill()
    time.sleep(0.05)
  for relay in relays:
    relay.join()
  summary = [{"process_id": i, "returncode": p.returncode, "seconds": t}
             for i, (p, t) in enumerate(zip(procs, ended))]
  failures = sorted((t, exit_code(p.returncode)) for p, t in zip(procs, ended) if p.returncode)
  code = 124 if timed_out else (failures[0][1] if failures else 0)
  return code, summary


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--timeout", type=float, default=None,
                      help="Seconds after which the processes still running are killed.")
  parser.add_argument("--port", type=int, default=None,
                      help="The coordinator's port; default: a free one.")
  parser.add_argument("--summary", default=None,
                      help="A JSON file for each process's exit status and seconds.")
  parser.add_argument("argv", nargs=argparse.REMAINDER,
                      help="-- script.py [its flags]: what every process runs.")
  args = parser.parse_args()
  argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
  if not argv:
    parser.error("give the script to run after --")
  # Ctrl-C reaches the children too (they share the terminal's process group); the launcher
  # itself waits for them to go.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  code, summary = launch(argv, args.num_processes, args.devices_per_process, args.timeout,
                         args.port)
  for record in summary:
    print(f"launch_local: process {record['process_id']} exited with {record['returncode']} "
          f"after {record['seconds']:.1f} s", file=sys.stderr)
  if args.summary:
    with open(args.summary, "w") as f:
      json.dump({"code": code, "processes": summary}, f, indent=1)
  sys.exit(code)


if __name__ == "__main__":
  main()
