"""`python -m threadline`: the same as the `threadline` command."""

import sys

from threadline.cli import main

if __name__ == "__main__":
    sys.exit(main())
