"""Sphinx configuration of the pyro-hvae documentation.

Build (warnings are errors, tutorials execute):

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

import pyro_hvae  # noqa: E402  (the installed package: autodoc documents what users import)

project = "pyro-hvae"
release = pyro_hvae.__version__
version = ".".join(release.split(".")[:2])
copyright = "pyro-hvae contributors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx_click",
    "myst_nb",
    "config_reference",
    "optional_automodule",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", ".jupyter_cache", "**.ipynb_checkpoints"]
root_doc = "index"

# -- autodoc: reST docstrings (``:param x:``), signatures with type hints -------
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_class_signature = "mixed"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True

# -- MyST and myst-nb ------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# Tutorials execute at build time and stop the build on any error. "cache" re-runs a
# tutorial when its source changes (a fresh checkout runs all of them); after a change
# to the package alone, rebuild with `-D nb_execution_mode=force`.
nb_execution_mode = "cache"
nb_execution_cache_path = str(HERE / "_build" / ".jupyter_cache")
nb_execution_timeout = 120  # seconds per cell; each tutorial runs well under a minute
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_output_stderr = "remove"  # library log lines and import-time warnings are noise on a page

# -- HTML ------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"pyro-hvae {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Deep hierarchical VAEs as Pyro programs",
    "fixed_sidebar": True,
    "page_width": "1180px",
    "sidebar_width": "240px",
}

