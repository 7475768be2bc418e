"""Running the ``pyro-hvae`` command line in-process, for tests: ``from clirun import run``."""

from click.testing import CliRunner

from pyro_hvae.cli import main


def run(*args, catch_exceptions: bool = False):
    """``pyro-hvae ARGS...`` (each argument passed through ``str``); unexpected exceptions propagate."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=catch_exceptions)
