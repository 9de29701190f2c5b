"""The how-to scripts in docs/howto run as the documentation shows them, and their checks hold.

Each script asserts its own claims (hypergradients agree with plain backprop to the relative
error its page states); running it here keeps the pages honest as the library changes.
"""

import pathlib
import runpy

import pytest

# Slow (each how-to trains and differentiates a model end to end): the quick loop,
# -m "not slow", skips this module.
pytestmark = pytest.mark.slow

HOWTO = pathlib.Path(__file__).resolve().parents[1] / "docs" / "howto"
SCRIPTS = sorted(HOWTO.glob("*.py"))


def test_there_are_howtos():
  assert len(SCRIPTS) >= 4, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_howto_runs_and_its_assertions_hold(script, capsys):
  runpy.run_path(str(script), run_name="__main__")
  assert "relative error" in capsys.readouterr().out
