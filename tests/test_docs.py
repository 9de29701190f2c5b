"""The documentation builds without a warning and shows every how-to script and public name."""

import pathlib
import sys
import types

import pytest

import revhyper
from background import Job

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def jobs(folder):
  # -n (nitpicky) turns every unresolved reference to revhyper's API into a warning, and -W
  # a warning into a failure: a renamed function or a broken docstring fails here.
  html = folder("docs") / "html"
  return {"html": Job([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b",
                       "html", str(DOCS), str(html)], out_dir=html, timeout=300)}


@pytest.mark.slow  # a Sphinx build in a subprocess
def test_docs_build_with_warnings_as_errors(background_jobs):
  build = background_jobs.results(jobs)["html"]
  assert build.returncode == 0, build.stdout + build.stderr
  for page in ("index", "how_it_works", "api/core", "howto/flax_nnx"):
    assert (build.out_dir / f"{page}.html").is_file(), page


def test_every_howto_script_is_included_by_a_page():
  pages = "".join(p.read_text() for p in DOCS.rglob("*.rst"))
  scripts = sorted((DOCS / "howto").glob("*.py"))
  assert scripts
  for script in scripts:
    assert f".. literalinclude:: {script.name}" in pages, script.name


def test_every_public_name_has_a_place_in_the_api_reference():
  # The core page lists the top level's names one by one; a submodule's page documents its
  # __all__ through automodule.
  core = (DOCS / "api" / "core.rst").read_text()
  missing = [name for name in revhyper.__all__ if f":: revhyper.{name}\n" not in core]
  assert not missing, f"add to docs/api/core.rst: {missing}"
  pages = "".join(p.read_text() for p in (DOCS / "api").glob("*.rst"))
  submodules = [name for name, value in vars(revhyper).items()
                if isinstance(value, types.ModuleType) and not name.startswith("_")]
  assert submodules
  for name in submodules:
    assert f".. automodule:: revhyper.{name}\n" in pages, f"no API page for revhyper.{name}"
