"""`python -m hpc_drseg …` is the same as the `drseg` command."""

from hpc_drseg.cli import main

raise SystemExit(main())
