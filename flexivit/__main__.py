"""``python -m flexivit`` (also what ``accelerate launch -m flexivit`` runs)."""

import sys

from flexivit.cli.main import main

sys.exit(main())
