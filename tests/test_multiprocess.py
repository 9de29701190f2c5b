"""Exact training on 2 JAX processes of 4 simulated CPU devices each, joined over gloo.

Each check starts ``tests/multiprocess_checks.py`` as two processes with
``experiments/launch_local.py`` (a free port, a timeout, each process's exit status and time),
beside the other tests (tests/background.py), and reads back what every process wrote. The
meta-optimisation runs three times: uninterrupted, killed (process 1 dies after iteration 3,
and process 0 must then fail on its own, within its heartbeat timeout), and restarted with
``resume``, which must end bit for bit where the uninterrupted run did.
"""

import json
import os
import sys

import numpy as np
import pytest

from background import Job
from sharding_checks import assert_within_float32_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "experiments", "launch_local.py")
SCRIPT = os.path.join(ROOT, "tests", "multiprocess_checks.py")
BENCHMARK = os.path.join(ROOT, "experiments", "benchmark_sharded.py")
# The launcher's own timeout comes first, so that it kills its processes; the pool's is a
# backstop for the launcher itself.
LAUNCH_TIMEOUT = 400
HEARTBEAT_TIMEOUT = 5  # seconds before the coordinator declares a silent process dead
LAYOUTS = ["model_sgd_weight_decay", "model_adamw", "data_sgd_weight_decay", "data_adamw"]


def jobs(folder):
  """Two processes for each check: every layout and the failures; three meta runs."""
  def launch(name, *flags, script=SCRIPT, **job):
    out_dir = folder(name)
    argv = [sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=4",
            f"--timeout={LAUNCH_TIMEOUT}", f"--summary={out_dir / 'summary.json'}", "--",
            script, f"--out_dir={out_dir}", *flags]
    # Exactness holds at XLA's backend level 0 too (one program for both loops), in half the
    # compile time; the launcher sets each process's device count.
    env = {"PYTHONPATH": ROOT, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    return Job(argv, out_dir=out_dir, env=env, timeout=LAUNCH_TIMEOUT + 60, **job)

  checkpoints = folder("meta_checkpoints")
  meta = ["--mode=meta", f"--heartbeat_timeout={HEARTBEAT_TIMEOUT}"]
  return {
      "checks": launch("checks", "--mode=checks"),
      "meta": launch("meta", *meta, f"--checkpoint_dir={folder('meta_alone')}"),
      "meta_killed": launch("meta_killed", *meta, f"--checkpoint_dir={checkpoints}",
                            "--kill_at=3", "--kill_process=1"),
      "meta_resumed": launch("meta_resumed", *meta, f"--checkpoint_dir={checkpoints}",
                             "--resume", after=("meta_killed",)),
      # A launcher through launch_local.py, as the docs show it (it compiles at level 0).
      "benchmark": launch("benchmark", "--quick", "--methods=reversible", script=BENCHMARK),
  }


def processes(done):
  """What each process wrote, in process order, and the launcher's summary."""
  with open(done.out_dir / "summary.json") as f:
    summary = json.load(f)
  results = []
  for i in range(2):
    path = done.out_dir / f"process_{i}.json"
    results.append(json.loads(path.read_text()) if path.exists() else None)
  return results, summary


@pytest.fixture(scope="module")
def runs(background_jobs):
  return background_jobs.results(jobs)


@pytest.fixture(scope="module")
def checks(runs):
  done = runs["checks"]
  assert done.returncode == 0, done.output[-4000:]
  results, _ = processes(done)
  return results


@pytest.mark.slow
def test_each_process_sees_every_device_and_owns_four(checks):
  for index, result in enumerate(checks):
    assert result["process_index"] == index and result["process_count"] == 2
    assert result["devices"] == 8 and result["local_devices"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS[:3])
def test_round_trips_rebuild_every_process_shards_bit_for_bit(checks, layout):
  for result in checks:
    trip = result["layouts"][layout]
    # The flag, and the rebuilt initial weights themselves against the originals.
    assert trip["round_trip_exact"] and trip["initial_params_bitwise"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_hypergradients_agree_with_one_device(checks, layout):
  # With the in-pass reversal check: a reverse loop that missed a bit on any device would give
  # NaN. Both processes read the same replicated hypergradient.
  first, second = (result["layouts"][layout] for result in checks)
  assert first["hypergradient"] == second["hypergradient"]
  for result in (first, second):
    # The sharded sums add in another order than one device's: AdamW's two float32 runs
    # differ by the sum of their errors (2.6e-6 on an AVX-512 Xeon, each about 1.3e-6 from
    # float64), so each is judged against float64 unroll.
    assert_within_float32_error(result)


@pytest.mark.slow
def test_model_parallel_processes_hold_their_own_blocks_of_the_weights(checks):
  for result in checks:
    # 64 hidden units over 8 devices: each process holds 4 blocks of 8 columns, half of w1.
    assert result["layouts"]["model_adamw"]["w1_local_shapes"] == [[16, 8]] * 4
    assert result["layouts"]["data_adamw"]["w1_local_shapes"] == [[16, 64]] * 4


@pytest.mark.slow
def test_each_process_holds_only_its_own_devices_bit_stacks(checks):
  for index, result in enumerate(checks):
    stack = result["stack"]
    assert stack["tail_shape"][0] == 8 and not stack["tail_fully_addressable"]
    assert stack["shards_on_local_devices_only"]
    # One tail row per device: process 0 holds rows 0-3, process 1 rows 4-7.
    assert stack["tail_local_rows"] == list(range(4 * index, 4 * index + 4))
    assert stack["tail_local_shard_shapes"] == [[1, stack["tail_shape"][1]]] * 4
    # Tails, pointers, flags, bounds and heads: each process holds half of the bytes.
    assert 2 * stack["local_bytes"] == stack["global_bytes"]
    # Each device pushed its own lanes' chunks; together they are one stack's.
    assert stack["ptr_sum"] == stack["one_stack_ptr"]
    assert stack["restored"] and stack["empty"]


@pytest.mark.slow
def test_a_reversal_that_fails_on_one_process_fails_on_every_process(checks):
  # Process 1's gradient is noise drawn anew at every evaluation, so the reverse loop cannot
  # rebuild its weights; the reversal check's verdict is reduced over every device, so both
  # processes return NaN, and neither waits for the other forever (the run ended).
  for result in checks:
    assert all(np.isnan(x) for x in result["one_process_fails"]["hypergradient"])


@pytest.mark.slow
def test_a_process_that_dies_takes_the_other_down_within_its_heartbeat_timeout(runs):
  done = runs["meta_killed"]
  results, summary = processes(done)
  killed, survivor = summary["processes"][1], summary["processes"][0]
  assert killed["returncode"] == -9  # SIGKILL, after meta-iteration 3
  assert survivor["returncode"] != 0 and done.returncode != 0
  assert survivor["seconds"] - killed["seconds"] < HEARTBEAT_TIMEOUT + 25
  assert "detected fatal errors" in done.stderr, done.stderr[-4000:]
  assert results == [None, None]  # neither got to the end


@pytest.mark.slow
def test_restarted_processes_end_bit_for_bit_where_an_uninterrupted_run_does(runs):
  for name in ("meta", "meta_resumed"):
    assert runs[name].returncode == 0, runs[name].output[-4000:]
  alone, _ = processes(runs["meta"])
  resumed, _ = processes(runs["meta_resumed"])
  for result in resumed:
    # Process 0 wrote ckpt 2 after iteration 1, and maybe ckpt 4 before it noticed the other
    # had died; both processes read the same one.
    assert result["resumed_from"] in ("ckpt_00000002.npz", "ckpt_00000004.npz")
    assert result["resumed_from"] == resumed[0]["resumed_from"]
  for a, b in zip(alone, resumed):
    assert a["final_bits"] == b["final_bits"] == alone[0]["final_bits"]
    assert a["meta_loss"] == b["meta_loss"] == alone[0]["meta_loss"]
    assert len(a["meta_loss"]) == 6


@pytest.mark.slow
def test_sharded_benchmark_runs_on_two_processes(runs):
  done = runs["benchmark"]
  assert done.returncode == 0, done.output[-4000:]
  with open(done.out_dir / "results.json") as f:
    results = json.load(f)
  machine = results["machine"]
  assert (machine["num_processes"], machine["devices_per_process"]) == (2, 4)
  assert results["config"]["devices"] == machine["num_devices"] == 8
  assert results["complete"] is True
  # Process 0 writes every process's peak memory. (The errors against one device are checked
  # by the single-process benchmark test and above.)
  assert len(results["peak_memory_per_process_bytes"]) == 2
  assert all(x > 0 for x in results["peak_memory_per_process_bytes"])
  assert results["methods"]["reversible"]["time_per_step_s"] > 0
  assert "reversible" in done.stdout  # process 0 printed the table
