import sys

from spa.cli.app import main

sys.exit(main())
