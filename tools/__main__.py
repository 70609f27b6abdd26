"""`python -m kvfs.tools ...`: the `kvfs` command itself (the daemon is started this way).
Owns nothing but this entry point."""

import sys

from .main import main

sys.exit(main())
