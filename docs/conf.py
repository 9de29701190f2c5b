"""Sphinx configuration for the revhyper documentation.

Build: ``sphinx-build -W --keep-going -n -b html docs docs/_build/html``.
"""

import importlib
import inspect
import os
import re
import sys

# Document the checkout this file sits in, whether or not it is the installed copy.
sys.path.insert(0, os.path.abspath(".."))

import revhyper  # noqa: E402

project = "revhyper"
author = "The revhyper authors"
copyright = "the revhyper authors"  # noqa: A001 (Sphinx's name for it)
release = revhyper.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"revhyper {release}"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Without network access there is no intersphinx inventory for JAX, NumPy, optax or the standard
# library: their types in signatures render as text rather than links. Nitpicky mode still
# checks every reference to revhyper's own objects.
nitpick_ignore_regex = [
    ("py:class", r"(jax|jaxlib|numpy|optax|os|collections\.abc|typing)(\..+)?"),
]

# The fields of revhyper's NamedTuples are documented by a comment beside each, which says
# what the field holds (and its dtype and shape); autodoc would show "Alias for field number
# N" instead. This puts the comment in its place.
_FIELD_ALIAS = re.compile(r"Alias for field number \d+$")
_FIELD_COMMENT = re.compile(r"^\s+(\w+):[^#\n]*#\s?(.*)$", re.M)


def _owner(name):
  """The object that holds ``name`` (a dotted path such as revhyper.Stats.bits_stored)."""
  parts = name.split(".")
  for i in range(len(parts) - 1, 0, -1):
    try:
      owner = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    for part in parts[i:-1]:
      owner = getattr(owner, part)
    return owner
  raise ImportError(name)


def _field_comments(app, what, name, obj, options, lines):
  del app, what, obj, options
  if len(lines) != 1 or not _FIELD_ALIAS.match(lines[0]):
    return
  owner = _owner(name)
  comments = dict(_FIELD_COMMENT.findall(inspect.getsource(owner)))
  field = name.rsplit(".", 1)[1]
  # A field without a comment keeps only its annotation, rather than the alias text. The
  # comments are code comments: |x| and 2**13 are maths there, not reStructuredText markup.
  lines[:] = [re.sub(r"([|*])", r"\\\1", comments[field])] if field in comments else []


def setup(app):
  # After napoleon (priority 500): the comments are plain text, not "type: description".
  app.connect("autodoc-process-docstring", _field_comments, priority=600)
