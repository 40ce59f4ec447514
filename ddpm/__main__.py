"""``python -m ddpm`` (and ``torchrun -m ddpm``) run the ``ddpm`` command."""

import sys

from ddpm.cli import main

sys.exit(main())
