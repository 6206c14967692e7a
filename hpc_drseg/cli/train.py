"""`drseg config show|check|keys`, `drseg info` (the configured model's size) and `drseg train`."""

from __future__ import annotations

import argparse
import json

from hpc_drseg.cli.common import EPILOG, add_command, add_config_args, setup_logging
from hpc_drseg.config import describe_fields, dump_config, load_config


def cmd_config_show(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    load_config(args.config, args.overrides)
    print(f"ok: {args.config or 'defaults'} is a valid configuration")
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    for key, default, doc in describe_fields():
        print(f"{key:<32} {default:<28} {doc}")
    return 0


def add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show, check or list configuration keys", epilog=EPILOG)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_config_args(add_command(actions, "show", cmd_config_show, help="print the resolved configuration as YAML"))
    add_config_args(add_command(actions, "check", cmd_config_check, help="validate a configuration"))
    add_command(actions, "keys", cmd_config_keys, help="list every key with its default and meaning")


def cmd_info(args: argparse.Namespace) -> int:
    from hpc_drseg.models import describe_model

    cfg = load_config(args.config, args.overrides)
    info = describe_model(cfg.model, cfg.data.image_px)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:<28} {value}")
    return 0


def add_info(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "info", cmd_info, help="parameters, training FLOPs and output shape of the configured model")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")


# ------------------------------------------------------------------------------- train, eval, report, predict
def cmd_train(args: argparse.Namespace) -> int:
    from hpc_drseg.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    setup_logging()
    result = train(
        cfg, allow_config_change=args.allow_config_change, allow_world_size_change=args.allow_world_size_change
    )
    print(f"{result.run_dir}: {result.reason} (epoch {result.progress.epoch}, step {result.progress.global_step})")
    return result.exit_code


def add_train(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "train", cmd_train, help="train a model (resumes an existing run directory)")
    add_config_args(p)
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though the config changes what the run computes (e.g. optim.lr); the change is recorded "
        "in RUN/config_changes.jsonl and config.yaml is rewritten",
    )
    p.add_argument(
        "--allow-world-size-change",
        action="store_true",
        help="resume with another number of ranks than the checkpoint was written by: goes on from the next epoch "
        "boundary and is no longer bit-exact",
    )
