"""Shared test configuration."""

import os

# Two CPU cores: keep XLA from spreading compilation and execution over phantom devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
