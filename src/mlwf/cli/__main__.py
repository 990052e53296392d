import sys

from mlwf.cli import main

sys.exit(main())
