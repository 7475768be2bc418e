"""The ``optional-automodule`` directive: ``automodule`` for a module that may not exist yet.

::

    .. optional-automodule:: pyro_hvae.evaluate

(in a MyST page, inside an ``{eval-rst}`` block, so that the docstrings are read as reST)

documents the module with ``automodule`` (``:members:``) when it can be imported, and
emits nothing (with an info line in the build log) when it cannot, so the build stays
free of warnings either way. The content of the directive, if any, is parsed before
the members when the module exists.
"""

from __future__ import annotations

import importlib.util

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)


class OptionalAutomodule(SphinxDirective):
    required_arguments = 1
    has_content = True

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            logger.info("optional-automodule: %s is not importable; not documented", name, location=self.get_location())
            return []
        # the class sphinx.ext.autodoc registered for `automodule` (it moved between Sphinx versions)
        automodule, _ = directives.directive("automodule", None, self.state.document)
        directive = automodule(
            "automodule",
            [name],
            {"members": None},
            StringList(list(self.content)),
            self.lineno,
            self.content_offset,
            self.block_text,
            self.state,
            self.state_machine,
        )
        return directive.run()


def setup(app):
    app.setup_extension("sphinx.ext.autodoc")
    app.add_directive("optional-automodule", OptionalAutomodule)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
