import sys

from mlwf.cli import command

sys.exit(command())
