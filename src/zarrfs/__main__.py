"""`python -m zarrfs`: the same as the `zarrfs` command."""

from __future__ import annotations

import sys

from zarrfs.faces.cli import console_main

sys.exit(console_main())
