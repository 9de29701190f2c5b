r"""Benchmark: the sharded hypergradient on 1 process of 8 devices against 2 processes of 4.

Runs experiments/benchmark_sharded.py twice with the same flags, one configuration after the
other on this machine (simulated CPU devices, experiments/launch_local.py): once as one
process whose mesh holds its 8 devices, once as 2 processes whose mesh holds their 4 devices
each, joined by jax.distributed over gloo. The program per device is the same; what differs is
that the collectives of the loss cross processes, and that each process holds its own devices'
state only. Prints, per configuration, the median time per training step of the sharded
reversible hypergradient (forward and reverse), XLA's plan and loop state per device, every
process's peak resident memory (XLA's plan per device times the devices a process holds is its
share of the device memory), and the error against the one-device run; writes
--out_dir/comparison.json and each run's results.json under --out_dir/<processes>x<devices>.

  python experiments/benchmark_processes.py --out_dir /tmp/revhyper_processes -- \
      --sizes=256,512,512,512,10 --steps=100 --methods=reversible,reversible_one --repeats=3

Everything after ``--`` goes to benchmark_sharded.py (not --out_dir or --devices). On one
machine both configurations share its cores: the times compare overheads, not speed-ups.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch_local  # noqa: E402  (beside this script)

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark_sharded.py")
CONFIGURATIONS = ((1, 8), (2, 4))  # (processes, devices per process)


def run(out_dir, flags, processes, devices, timeout):
  """One benchmark_sharded.py run; returns its results.json (written by process 0)."""
  run_dir = os.path.join(out_dir, f"{processes}x{devices}")
  os.makedirs(run_dir, exist_ok=True)
  code, _ = launch_local.launch([SCRIPT, *flags, f"--out_dir={run_dir}"], processes, devices,
                                timeout=timeout)
  if code:
    raise SystemExit(f"benchmark_sharded.py on {processes} x {devices} devices failed ({code})")
  with open(os.path.join(run_dir, "results.json")) as f:
    return json.load(f)


def summary(results):
  """The sharded method's numbers of one run."""
  record = results["methods"]["reversible"]
  return {"processes": results["machine"]["num_processes"],
          "devices_per_process": results["machine"]["devices_per_process"],
          "time_per_step_s": record.get("time_per_step_s"),
          "times_s": record.get("times_s"),
          "plan_per_device_bytes": record["memory"]["planned_bytes"],
          "loop_state_per_device_bytes": record["memory"]["loop_carry_bytes"],
          "peak_memory_per_process_bytes": results["peak_memory_per_process_bytes"],
          "error": record.get("error"),
          "load_average": results["machine"]["load_average"]}


def table(rows):
  mib = lambda n: f"{n / 2**20:.1f} MiB"
  lines = [f"{'layout':<22}{'time/step':>12}{'plan/device':>14}{'state/device':>14}"
           f"{'plan/process':>14}{'peak memory per process':>32}{'error':>10}"]
  for r in rows:
    layout = f"{r['processes']} process x {r['devices_per_process']} dev"
    step = "-" if r["time_per_step_s"] is None else f"{r['time_per_step_s'] * 1e3:.0f} ms"
    error = "-" if r["error"] is None else f"{r['error']:.1e}"
    peaks = ", ".join(mib(p) for p in r["peak_memory_per_process_bytes"])
    per_process = r["plan_per_device_bytes"] * r["devices_per_process"]
    lines.append(f"{layout:<22}{step:>12}{mib(r['plan_per_device_bytes']):>14}"
                 f"{mib(r['loop_state_per_device_bytes']):>14}{mib(per_process):>14}"
                 f"{peaks:>32}{error:>10}")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out_dir", default="/tmp/revhyper_processes")
  parser.add_argument("--timeout", type=float, default=7200,
                      help="Seconds each configuration may take.")
  parser.add_argument("flags", nargs=argparse.REMAINDER,
                      help="-- flags of benchmark_sharded.py")
  args = parser.parse_args()
  flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
  os.makedirs(args.out_dir, exist_ok=True)
  rows = [summary(run(args.out_dir, flags, p, d, args.timeout)) for p, d in CONFIGURATIONS]
  with open(os.path.join(args.out_dir, "comparison.json"), "w") as f:
    json.dump({"command": " ".join(sys.argv), "configurations": rows}, f, indent=1)
  print(table(rows))


if __name__ == "__main__":
  main()
