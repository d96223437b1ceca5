"""`python -m hvplace.cli ...`: the `hvplace` command."""

import sys

from hvplace.cli.main import main

sys.exit(main())
