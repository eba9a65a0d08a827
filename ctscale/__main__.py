"""``python -m ctscale`` (and ``torchrun -m ctscale``) is the ``ctscale`` command."""

from ctscale.cli import run

run()
