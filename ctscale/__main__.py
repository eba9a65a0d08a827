"""``python -m ctscale`` (and ``torchrun -m ctscale``) is the ``ctscale`` command."""

import sys

from ctscale.cli import main

sys.exit(main())
