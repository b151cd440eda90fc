"""``python -m fxmerge``: the ``fxmerge`` command line."""

import sys

from fxmerge.cli import main

if __name__ == "__main__":
    sys.exit(main())
