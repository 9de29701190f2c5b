"""The README is a front door: its quickstart runs, its commands are the ones CI runs, and every
number it states is backed by the documentation page it links to."""

import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 200  # what a reader takes in before the documentation takes over


@pytest.mark.slow  # three compilations of a 200-step run
def test_quickstart_runs_and_agrees_with_unroll(capsys):
  code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
  namespace = {}
  exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 (our own README)
  assert bool(namespace["rt"].exact)
  unrolled = namespace["hypergrad"](namespace["hparams"], np.log(0.05), "unroll")
  np.testing.assert_allclose(namespace["d_log_lr"], unrolled[1], rtol=1e-4)
  np.testing.assert_allclose(namespace["d_hparams"]["l2"], unrolled[0]["l2"], rtol=1e-4)


@pytest.mark.slow  # the quickstart again, then a clipped AdamW run by both methods
def test_optax_style_example_runs_and_agrees_with_unroll():
  quickstart, optax_style = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[:2]
  namespace = {}
  exec(compile(quickstart + optax_style, str(README), "exec"), namespace)  # noqa: S102
  unrolled = namespace["jax"].grad(lambda lr: namespace["meta_adamw"](lr, "unroll")[0])(
      np.log(1e-2))
  np.testing.assert_allclose(namespace["d_adamw"], unrolled, rtol=1e-4)


def test_readme_names_exactly_two_setup_commands_and_the_ci_runs_the_test_one():
  commands = re.findall(r"```bash\n(pip install[^\n]*)\n```", README.read_text())
  setup = [c for c in commands if "&&" in c]
  assert len(setup) == 2, setup
  ci = (README.parent / ".ci" / "run").read_text()
  test_command = [c for c in setup if "pytest" in c][0]
  # CI runs each part on its own line, so that a failed install stops it under set -e.
  for part in test_command.split(" && "):
    assert part.replace("pip install", "python -m pip install") in ci or part in ci, part


def test_readme_is_short_and_names_the_quick_loop():
  text = README.read_text()
  assert len(text.splitlines()) <= MAX_LINES
  assert '`python -m pytest -q -m "not slow"`' in text
  assert '-m "not slow"' in (ROOT / "docs" / "contributing.rst").read_text()


def test_every_link_of_the_readme_resolves():
  links = re.findall(r"\]\(([^)#]+)\)", README.read_text())
  local = [link for link in links if "://" not in link]
  assert local
  missing = [link for link in local if not (ROOT / link).exists()]
  assert not missing, missing


def test_every_headline_number_is_on_the_pages_it_links_to():
  # The "What it delivers" table: each row's numbers must appear on the documentation pages
  # that the row cites, so that the README never states what the documentation does not back.
  text = README.read_text()
  section = text[text.index("## What it delivers"):]
  section = section[:section.index("\n## ")]
  rows = [line for line in section.splitlines() if line.startswith("| ") and "](" in line]
  assert len(rows) >= 5
  for row in rows:
    pages = "".join((ROOT / p).read_text() for p in re.findall(r"\]\(([^)]+)\)", row))
    claim = row.split("|")[2]
    for number in re.findall(r"\d[\d,.]*\d|\d", claim):
      assert number in pages, f"{number!r} of {claim.strip()!r} is not on its pages"
