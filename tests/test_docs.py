"""The documentation builds without a warning, and every how-to script is shown on a page."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_docs_build_with_warnings_as_errors(tmp_path):
  # -n (nitpicky) turns every unresolved reference to revhyper's API into a warning, and -W
  # a warning into a failure: a renamed function or a broken docstring fails here.
  build = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html",
       str(DOCS), str(tmp_path / "html")],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert build.returncode == 0, build.stdout + build.stderr
  for page in ("index", "how_it_works", "api/core", "howto/flax_nnx"):
    assert (tmp_path / "html" / f"{page}.html").is_file(), page


def test_every_howto_script_is_included_by_a_page():
  pages = "".join(p.read_text() for p in DOCS.rglob("*.rst"))
  scripts = sorted((DOCS / "howto").glob("*.py"))
  assert scripts
  for script in scripts:
    assert f".. literalinclude:: {script.name}" in pages, script.name
