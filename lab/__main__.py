"""`python -m hvplace.lab ...`: the lab CLI without the `hvplace` front end."""

from hvplace.lab.cli import main

raise SystemExit(main())
