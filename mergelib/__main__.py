"""`python -m mergelib`: the same command as `mergelib`."""

import sys

from mergelib.cli import main

sys.exit(main())
