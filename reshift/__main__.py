"""``python -m reshift`` runs the CLI."""

import sys

from reshift.cli import main

sys.exit(main())
