"""`python -m tiermap ...` runs the `tiermap` command."""

import sys

from tiermap.cli import main

if __name__ == "__main__":
    sys.exit(main())
