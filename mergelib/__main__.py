import sys

from mergelib.cli import main

sys.exit(main())
