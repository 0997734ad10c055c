"""`python -m runner.server`: the same as `headlock serve`."""

import sys

from runner.cli import main

raise SystemExit(main(["serve", *sys.argv[1:]]))
