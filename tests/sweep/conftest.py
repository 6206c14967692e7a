"""The sweep tests share sweep_testkit.py; with --import-mode=importlib a test module cannot import a sibling
module unless its folder is on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)
