"""What several processes need that one process can check: who writes the meta-optimisation's
files, and the local launcher's environment. The runs on 2 processes are in
test_multiprocess.py.
"""

import os
import sys

import jax
import jax.numpy as jnp

import revhyper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
import launch_local  # noqa: E402  (experiments/ is no package)


def test_only_process_zero_writes_and_every_process_resumes(tmp_path, monkeypatch):
  # One process standing in for process 1 of several: it writes nothing, and it resumes from
  # what process 0 wrote.
  meta_loss = lambda h: jnp.sum((h["a"] - 1.0) ** 2)
  shared = tmp_path / "shared"
  kw = dict(checkpoint_dir=shared, checkpoint_every=2, progress=False)
  first = revhyper.meta.meta_optimize(meta_loss, {"a": jnp.zeros(3)}, num_iterations=4, **kw)
  written = sorted(os.listdir(shared))
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  other = tmp_path / "other"
  revhyper.meta.meta_optimize(meta_loss, {"a": jnp.zeros(3)}, num_iterations=4,
                              **dict(kw, checkpoint_dir=other))
  assert not other.exists() or not os.listdir(other)
  resumed = revhyper.meta.meta_optimize(meta_loss, {"a": jnp.zeros(3)}, num_iterations=6,
                                        **dict(kw, resume=True))
  assert sorted(os.listdir(shared)) == written  # read, not written
  assert [r["meta_loss"] for r in resumed.history[:4]] == [
      r["meta_loss"] for r in first.history]


def test_launcher_gives_each_process_its_device_count():
  env = launch_local.process_env(4, {"XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
                                                  "--xla_backend_optimization_level=0"})
  assert env["XLA_FLAGS"] == ("--xla_backend_optimization_level=0 "
                              "--xla_force_host_platform_device_count=4")
  assert launch_local.process_env(2, {})["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=2")
  assert launch_local.exit_code(-9) == 137 and launch_local.exit_code(3) == 3
