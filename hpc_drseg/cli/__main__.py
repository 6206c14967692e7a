"""`python -m hpc_drseg.cli …` is the same as the `drseg` command (as `python -m hpc_drseg …` is)."""

from hpc_drseg.cli import main

raise SystemExit(main())
