"""``python -m pyro_hvae``: the ``pyro-hvae`` command line (what ``torchrun -m pyro_hvae`` starts)."""

from pyro_hvae.cli import main

if __name__ == "__main__":
    main(prog_name="pyro-hvae")
