"""``python -m csl train | eval | predict | demo | analyze | split | report`` (same as the ``csl`` console script)."""

import sys

from .cli import main

sys.exit(main())
