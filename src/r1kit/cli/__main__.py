"""`python -m r1kit.cli VERB ...`: the same as the `r1kit` command."""

from r1kit.cli import main

raise SystemExit(main())
