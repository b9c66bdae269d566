"""``python -m cellrl ...``: the same command line as the ``cellrl`` entry point."""
import sys

from .cli import main

sys.exit(main())
