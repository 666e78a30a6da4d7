"""``python -m jobs.benchmark batch|index|serve ...``: see ``jobs.benchmark.cli``."""

import sys

from jobs.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
