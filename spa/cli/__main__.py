import sys

from spa.cli.app import entry

sys.exit(entry())
