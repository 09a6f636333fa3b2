"""`python -m herd_loadgen ...`: the same command line as `herd bench`."""

import sys

from herd_loadgen.cli import main

sys.exit(main(prog="python -m herd_loadgen"))
