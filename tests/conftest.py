"""Shared test configuration, and the session's background subprocesses (tests/background.py)."""

import os

import pytest

# Two CPU cores: keep XLA from spreading compilation and execution over phantom devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import background  # noqa: E402  (its pool copies the environment set above)


def _has_jobs(item):
  return callable(getattr(getattr(item, "module", None), "jobs", None))


def pytest_collection_modifyitems(items):
  # Modules that wait for subprocesses run last, so that their jobs run beside the others.
  items.sort(key=_has_jobs)


_POOLS = []


@pytest.fixture(scope="session", autouse=True)
def background_jobs(request, tmp_path_factory):
  """Starts the jobs of every selected module that has some, in the order the modules run."""
  pool = background.Pool(tmp_path_factory.mktemp)
  _POOLS.append(pool)
  for module in dict.fromkeys(item.module for item in request.session.items if _has_jobs(item)):
    pool.start(module.jobs)
  yield pool
  pool.close()


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
