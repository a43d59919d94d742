import sys

from rstpm.cli import main

sys.exit(main())
