"""Several processes: the launchers' flags and ``jax.distributed.initialize``.

A launcher that runs on several processes (one per host, or several on one machine with
``experiments/launch_local.py``) defines the flags with ``define_flags()`` and calls
``initialize_from_flags()`` first thing in ``main``, before anything asks JAX for its devices:

  --coordinator=HOST:PORT --num_processes=N --process_id=I   every process, I = 0 ... N - 1
  --coordinator=auto                                          Slurm, Open MPI, Cloud TPU or a
                                                              Kubernetes JobSet say the rest

Without ``--coordinator`` the launcher runs as one process, as before. Every process then runs
the same program; ``jax.devices()`` lists every process's devices and ``jax.local_devices()``
its own. On CPUs the processes' collectives go over gloo (TCP).

The timeouts are short by default, so that a process that dies takes the others down within
seconds instead of the library's minutes: ``--heartbeat_timeout`` after its last heartbeat the
coordinator declares it dead, and every other process aborts with "Terminating process because
the JAX distributed service detected fatal errors".
"""

from absl import flags
import jax

flags.DEFINE_string(
    "coordinator", None, "Address HOST:PORT of process 0's coordinator, the same for every "
    "process; 'auto' lets JAX read it from the cluster (Slurm, Open MPI, Cloud TPU, "
    "Kubernetes). Unset: one process.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator=HOST:PORT).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 ... num_processes - 1.")
flags.DEFINE_integer("initialization_timeout", 120, "Seconds the processes wait for each "
                     "other at start-up.")
flags.DEFINE_integer("heartbeat_timeout", 10, "Seconds without a heartbeat after which a "
                     "process is declared dead and the others abort.")

FLAGS = flags.FLAGS


def initialize(coordinator, num_processes=None, process_id=None, *,
               initialization_timeout=120, heartbeat_timeout=10):
  """Joins this process to the others; returns ``(process_index, process_count)``.

  Args:
    coordinator: ``"HOST:PORT"`` of process 0 (which starts the coordinator there), ``"auto"``
      for the cluster's own description, or None for a single process (nothing is done).
    num_processes: the number of processes, with an explicit coordinator.
    process_id: this process's index, with an explicit coordinator.
    initialization_timeout: seconds to wait for every process to join.
    heartbeat_timeout: seconds of silence after which a process is declared dead; the others
      then abort with an error naming it.

  Raises:
    ValueError: an explicit coordinator without ``num_processes`` and ``process_id``.
  """
  if coordinator is None:
    return 0, 1
  # CPU devices of several processes talk over gloo (the default CPU client has no
  # collectives across processes); other platforms ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeouts = dict(initialization_timeout=initialization_timeout,
                  heartbeat_timeout_seconds=heartbeat_timeout)
  if coordinator == "auto":
    jax.distributed.initialize(**timeouts)
  else:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator=HOST:PORT needs --num_processes and --process_id.")
    jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
  return jax.process_index(), jax.process_count()


def initialize_from_flags():
  """``initialize`` with the flags of this module; call it before using JAX's devices."""
  return initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                    initialization_timeout=FLAGS.initialization_timeout,
                    heartbeat_timeout=FLAGS.heartbeat_timeout)
