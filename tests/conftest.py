"""Shared test configuration, and the session's background subprocesses (tests/background.py)."""

import os

import pytest

# Two CPU cores: keep XLA from spreading compilation and execution over phantom devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import background  # noqa: E402  (its pool copies the environment set above)


def _waits_for_jobs(item):
  """Whether ``item`` waits for its module's background jobs (asks for ``background_jobs``)."""
  module = getattr(item, "module", None)
  return callable(getattr(module, "jobs", None)) and "background_jobs" in item.fixturenames


def pytest_collection_modifyitems(items):
  # Tests that wait for subprocesses run last, so that their jobs run beside the others.
  items.sort(key=_waits_for_jobs)


_POOLS = []


@pytest.fixture(scope="session", autouse=True)
def _background_pool(request, tmp_path_factory):
  """Starts, in the order the tests run, the jobs that a selected test waits for.

  ``request.session.items`` is the selection after ``-m``, ``-k`` and ``--deselect``: a module
  whose waiting tests are all deselected starts nothing, so ``-m "not slow"`` starts no job.
  """
  pool = background.Pool(tmp_path_factory.mktemp)
  _POOLS.append(pool)
  waiting = [item.module for item in request.session.items if _waits_for_jobs(item)]
  for module in dict.fromkeys(waiting):
    pool.start(module.jobs)
  yield pool
  pool.close()


@pytest.fixture(scope="session")
def background_jobs(_background_pool):
  """The session's pool of background jobs (tests/background.py); ``.results(jobs)`` waits."""
  return _background_pool


def pytest_terminal_summary(terminalreporter, config):
  # Beside --durations: the CPU time of each background job (its wall time depends on what
  # ran beside it).
  if config.option.durations is None or not _POOLS:
    return
  jobs = _POOLS[0].cpu_seconds()
  timeline = ", ".join(f"{k} at {t:.0f} s" for k, t in _POOLS[0].timeline().items())
  terminalreporter.write_sep("=", f"background jobs: {sum(jobs.values()):.0f} CPU-s; {timeline}")
  for key, seconds in list(jobs.items())[:config.option.durations or None]:
    terminalreporter.write_line(f"{seconds:.2f}s cpu  {key}")
