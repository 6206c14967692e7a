"""Field checks shared by the run-config and sweep-spec schemas; each error names the key and the valid range."""

from __future__ import annotations

import math

from hpc_drseg.errors import InputError


class ConfigError(InputError):
    """A configuration key or value is wrong; the message names it and says how to fix it."""


def check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: got {value}; it must be > 0")


def check_range(key: str, value: float, low: float, high: float) -> None:
    # `not low <= value <= high` is also true for NaN, which is never a meaningful setting
    if not low <= value <= high:
        raise ConfigError(f"{key}: got {value}; it must be in [{low}, {high}]")


def check_finite(key: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key}: got {value}; it must be a finite number")


def check_unique_choices(key: str, values: list[str]) -> None:
    """Entries are already checked against their Literal by the loader; a repeat is the remaining mistake."""
    if len(set(values)) != len(values):
        raise ConfigError(f"{key}: got {values}; list each entry once")
