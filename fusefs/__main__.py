"""``python -m fusefs`` runs the CLI."""

import sys

from fusefs.cli import main

sys.exit(main())
