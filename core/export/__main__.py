"""`python -m core.export RUN_DIR` (see core/export/cli.py)."""
from __future__ import annotations

import sys

from core.export.cli import main

sys.exit(main())
