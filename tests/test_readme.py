"""The README's quickstart runs as written and its claims hold."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_agrees_with_unroll(capsys):
  code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
  namespace = {}
  exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 (our own README)
  assert bool(namespace["rt"].exact)
  unrolled = namespace["hypergrad"](namespace["hparams"], np.log(0.05), "unroll")
  np.testing.assert_allclose(namespace["d_log_lr"], unrolled[1], rtol=1e-4)
  np.testing.assert_allclose(namespace["d_hparams"]["l2"], unrolled[0]["l2"], rtol=1e-4)


def test_readme_names_exactly_two_setup_commands_and_the_ci_runs_the_test_one():
  commands = re.findall(r"```bash\n(pip install[^\n]*)\n```", README.read_text())
  setup = [c for c in commands if "&&" in c]
  assert len(setup) == 2, setup
  ci = (README.parent / ".ci" / "run").read_text()
  test_command = [c for c in setup if "pytest" in c][0]
  assert test_command in ci
