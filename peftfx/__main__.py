"""``python -m peftfx``: the command line, where the ``peftfx`` script is not on the PATH."""

from .cli import app

app(prog_name="peftfx")
