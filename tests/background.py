"""The session's subprocesses, run on the core that the in-process tests leave idle.

Launcher tests, multi-device checks and the docs build spend their time in subprocesses, each
paying Python's and JAX's start-up and XLA's compilation, while the in-process tests keep one
core of two busy. A module that needs subprocesses lists them in a module-level function
``jobs(folder) -> {name: Job}`` (``folder(name)`` makes a fresh directory) and waits for them
in a fixture with ``background.results(jobs)``. When the session starts, conftest.py starts the
jobs of every module with a selected test that waits for them (one that asks for the
``background_jobs`` fixture, directly or through another fixture) and runs those tests last, so
that the jobs run beside the in-process tests: one at a time while a test runs, two at a time
while a test waits for one. A module run alone starts its jobs when it first waits for them.
"""

import os
import pathlib
import signal
import subprocess
import threading
import time
import traceback
from typing import Callable, NamedTuple, Optional

REPO = pathlib.Path(__file__).resolve().parents[1]


class Job(NamedTuple):
  argv: list
  out_dir: Optional[pathlib.Path] = None  # where the job writes; handed back in its result
  env: Optional[dict] = None  # variables to set; None as a value removes the variable
  after: tuple = ()  # names of jobs of the same module that must finish first
  before: Optional[Callable[[], None]] = None  # called just before the job starts
  timeout: float = 600.0


class Done(NamedTuple):
  out_dir: Optional[pathlib.Path]
  returncode: int
  stdout: str
  stderr: str
  cpu_seconds: float  # user and system time of the process alone, start-up included

  @property
  def output(self):
    return self.stdout + self.stderr


class Pool:
  """Runs jobs in order (respecting ``after``), one at a time, or two while someone waits."""

  def __init__(self, mktemp, env=None):
    self._mktemp = mktemp  # name -> a fresh directory
    self._env = dict(os.environ if env is None else env)  # tests may change os.environ later
    self._logs = mktemp("background_logs")
    self._cond = threading.Condition()
    self._names = {}  # jobs function -> {name: key}
    self._pending = []  # (key, job, keys of its prerequisites)
    self._running = {}  # key -> (Popen, stdout file, stderr file, start time, Job)
    self._done = {}  # key -> Done
    self._waiting = 0
    self._closed = False
    self._times = {"started": time.monotonic()}  # and "first wait", "last done"
    self._thread = threading.Thread(target=self._loop, name="background-jobs", daemon=True)
    self._thread.start()

  def start(self, jobs):
    """Queues the jobs of a module's ``jobs`` function (once); returns {name: key}."""
    with self._cond:
      if jobs in self._names:
        return self._names[jobs]
    prefix = jobs.__module__
    specs = jobs(self._mktemp)
    names = {name: f"{prefix}::{name}" for name in specs}
    with self._cond:
      self._names[jobs] = names
      for name, job in specs.items():
        self._pending.append((names[name], job, [names[a] for a in job.after]))
      self._cond.notify_all()
    return names

  def results(self, jobs):
    """Waits for the jobs of ``jobs`` (starting them if needed): {name: Done}."""
    names = self.start(jobs)
    with self._cond:
      self._times.setdefault("first wait", time.monotonic())
      self._waiting += 1
      self._cond.notify_all()
      try:
        while not all(key in self._done for key in names.values()):
          self._cond.wait()
      finally:
        self._waiting -= 1
      return {name: self._done[key] for name, key in names.items()}

  def cpu_seconds(self):
    """{key: CPU seconds} of the finished jobs, the longest first."""
    with self._cond:
      done = sorted(self._done.items(), key=lambda kv: -kv[1].cpu_seconds)
      return {key: d.cpu_seconds for key, d in done}

  def timeline(self):
    """Seconds from the pool's start to the first wait for a job and to the last job's end."""
    with self._cond:
      return {k: t - self._times["started"] for k, t in self._times.items() if k != "started"}

  def close(self):
    """Stops the scheduler and kills what is still running (a session cut short)."""
    with self._cond:
      self._closed = True
      self._cond.notify_all()
    self._thread.join()
    for proc, out, err, _, _ in self._running.values():
      proc.kill()
      proc.wait()
      out.close()
      err.close()

  def _launch(self, key, job):
    stem = self._logs / key.replace("::", "-")
    env = dict(self._env)
    for name, value in (job.env or {}).items():
      if value is None:
        env.pop(name, None)
      else:
        env[name] = value
    out, err = open(f"{stem}.out", "w+"), open(f"{stem}.err", "w+")
    try:
      if job.before is not None:
        job.before()
      proc = subprocess.Popen(job.argv, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
    except Exception:  # noqa: BLE001  (the job fails, not the scheduler)
      out.close()
      err.close()
      self._done[key] = Done(job.out_dir, -1, "", traceback.format_exc(), 0.0)
      return False
    self._running[key] = (proc, out, err, time.monotonic(), job)
    return True

  def _reap(self):
    """Collects finished jobs (and kills those past their timeout); True if any finished."""
    finished = False
    for key, (proc, out, err, started, job) in list(self._running.items()):
      # wait4 reaps the process and reports its own resource usage.
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid == 0:
        if time.monotonic() - started > job.timeout:
          os.kill(proc.pid, signal.SIGKILL)
        continue
      proc.returncode = os.waitstatus_to_exitcode(status)
      out.seek(0)
      err.seek(0)
      self._done[key] = Done(job.out_dir, proc.returncode, out.read(), err.read(),
                             usage.ru_utime + usage.ru_stime)
      out.close()
      err.close()
      del self._running[key]
      self._times["last done"] = time.monotonic()
      finished = True
    return finished

  def _loop(self):
    with self._cond:
      while not self._closed:
        progress = self._reap()
        limit = 2 if self._waiting else 1  # the in-process tests hold the other core
        for entry in list(self._pending):
          if len(self._running) >= limit:
            break
          key, job, prerequisites = entry
          if all(p in self._done for p in prerequisites):
            self._pending.remove(entry)
            progress |= not self._launch(key, job)  # a job that could not start is done
        if progress:
          self._cond.notify_all()
        else:
          self._cond.wait(0.1 if self._running else None)
