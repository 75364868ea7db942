"""``python -m flexivit`` (also what ``accelerate launch -m flexivit`` runs)."""

import sys

from .cli import main

sys.exit(main())
