"""Facts that live in one Python module and, by necessity, as a literal in a shell script."""

from __future__ import annotations

import re
from pathlib import Path

from hpc_drseg.constants import EXIT_RESUMABLE

REPO = Path(__file__).resolve().parents[1]


def test_train_sh_uses_the_resumable_exit_status():
    script = (REPO / "slurm" / "train.sh").read_text()
    literal = re.search(r"^EXIT_RESUMABLE=(\d+)", script, flags=re.MULTILINE)
    assert literal is not None, "slurm/train.sh no longer defines EXIT_RESUMABLE"
    assert int(literal.group(1)) == EXIT_RESUMABLE
