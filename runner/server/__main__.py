"""`python -m runner.server`: `headlock serve`, with every option of `runner.server._command`."""

import argparse

from runner.server._command import add_arguments, run

_parser = argparse.ArgumentParser(prog="python -m runner.server", description="serve the Apify API v2 locally")
add_arguments(_parser)
raise SystemExit(run(_parser.parse_args()))
