"""Helpers shared by the `drseg` command modules: the builder of one command, config arguments, logging set-up.

Standard library only, like every module imported before a command runs: `drseg --help` must stay instant.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable

from hpc_drseg.errors import InputError

EPILOG = "Overrides are dotted key=value pairs, e.g. optim.lr=3e-4 model.cbam.sites=[aspp]; see `drseg config keys`."
Handler = Callable[[argparse.Namespace], int]


def fmt_metric(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def setup_logging() -> None:
    # Only the main process talks; the others log warnings and errors.
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")


def int_list(option: str, text: str) -> list[int]:
    """'1,2,4' → [1, 2, 4]; anything else is an error naming the option."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise InputError(f"{option}: got {text!r}; give comma-separated integers, e.g. 1,2") from None
    return values


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML file of partial overrides (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def add_command(sub: argparse._SubParsersAction, name: str, handler: Handler, **kwargs) -> argparse.ArgumentParser:
    """One (sub-)command whose parsed arguments go to `handler`; every command shows the overrides epilog."""
    parser = sub.add_parser(name, epilog=EPILOG, **kwargs)
    parser.set_defaults(func=handler)
    return parser
