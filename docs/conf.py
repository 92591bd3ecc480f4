"""Sphinx configuration for the optimlab documentation.

Build (warnings are errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

The per-method pages under ``docs/methods/`` are generated from the registry at build time by the
``optimlab_methods`` extension in ``docs/_ext/``; do not edit them by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

# the installed package (pip install -e '.[docs]'), imported after the path set-up above
import optimlab

# -- project -----------------------------------------------------------------------------------------------
project = "optimlab"
author = "the optimlab authors"
copyright = "the optimlab authors, MIT License"
release = optimlab.__version__
version = ".".join(release.split(".")[:2])

# -- general -----------------------------------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",  # the "Args:" / "Attributes:" sections of docstrings
    "sphinx.ext.viewcode",
    "optimlab_methods",
]
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
default_role = "code"  # a stray `single backtick` renders as code rather than as italics

# -- autodoc -----------------------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True  # show `lr=1e-3` as written, not `0.001`
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = True
add_module_names = False

# -- HTML --------------------------------------------------------------------------------------------------
try:
    import furo  # noqa: F401

    html_theme = "furo"
except ImportError:  # the docs extra installs furo; fall back to Sphinx's own theme without it
    html_theme = "alabaster"
html_title = f"optimlab {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
