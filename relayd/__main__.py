"""``python -m relayd``: the same as the ``relayd`` command."""

import sys

from relayd.cli import main

if __name__ == "__main__":
    sys.exit(main())
