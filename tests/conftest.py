"""Shared fixtures: a small synthetic DDR tree and its shards, made once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
