"""Guarantees, bad inputs: every mistake a careless user makes is one line naming the file, key or value, exit 2,
and leaves its inputs untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
from guarantees_harness import Case

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b]\n"


def write(relative: str, text: str | bytes):
    def setup(paths) -> None:
        target = Path(paths["tmp"]) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(text if isinstance(text, bytes) else text.encode())

    return setup


CASES = [
    Case("unknown key", ("config", "check", "optim.lrr=1"), 2, "unknown key 'optim.lrr'"),
    Case("override not yaml", ("config", "check", "model.cbam.sites=[aspp"), 2, "model.cbam.sites=[aspp"),
    Case("override no equals", ("config", "check", "optim"), 2, "section.key=value"),
    Case("wrong type", ("config", "check", "train.batch_size=2.5"), 2, "train.batch_size: got 2.5"),
    Case("bad choice", ("config", "check", "model.name=segformer"), 2, "model.name"),
    Case("negative patience", ("config", "check", "optim.plateau_patience=-3"), 2, "optim.plateau_patience"),
    Case("negative min_lr", ("config", "check", "optim.min_lr=-1"), 2, "optim.min_lr"),
    Case("negative aux weight", ("config", "check", "loss.aux_weight=-5"), 2, "loss.aux_weight"),
    Case("nan dice eps", ("config", "check", "loss.dice_eps=.nan"), 2, "loss.dice_eps"),
    Case("negative seed", ("config", "check", "train.seed=-1"), 2, "train.seed"),
    Case("negative pos_weight", ("config", "check", "loss.pos_weight=[4, -1, 1.5, 2]"), 2, "loss.pos_weight (EX)"),
    Case("infinite focal gamma", ("config", "check", "loss.focal_gamma=.inf"), 2, "loss.focal_gamma"),
    Case("negative weight decay", ("config", "check", "optim.weight_decay=-1"), 2, "optim.weight_decay"),
    Case("monitor not validated", ("config", "check", "train.monitor=val/acc"), 2, "train.monitor"),
    Case("plateau monitor", ("config", "check", "optim.plateau_monitor=loss"), 2, "optim.plateau_monitor"),
    Case("image size multiple", ("config", "check", "data.image_px=500"), 2, "divisible by 32"),
    Case("missing config file", ("config", "check", "--config", "{tmp}/nope.yaml"), 2, "{tmp}/nope.yaml"),
    Case(
        "alias bomb",
        ("config", "check", "--config", "{tmp}/bomb.yaml"),
        2,
        "anchors and aliases",
        untouched=("{tmp}/bomb.yaml",),
        setup=write("bomb.yaml", ALIAS_BOMB),
        timeout_s=30,
    ),
    Case(
        "duplicate key",
        ("config", "check", "--config", "{tmp}/dup.yaml"),
        2,
        "'seed' appears twice",
        setup=write("dup.yaml", "train:\n  seed: 1\n  seed: 2\n"),
    ),
    Case(
        "config not utf-8",
        ("config", "check", "--config", "{tmp}/latin1.yaml"),
        2,
        "{tmp}/latin1.yaml: not a UTF-8",
        setup=write("latin1.yaml", "name: caf\xe9\n".encode("latin-1")),
    ),
    Case(
        "top level not a mapping",
        ("config", "check", "--config", "{tmp}/list.yaml"),
        2,
        "top level must be a mapping",
        setup=write("list.yaml", "- 1\n"),
    ),
    Case("bench workers", ("bench", "data", "--workers", "a,b"), 2, "--workers: got 'a,b'"),
    Case("sweep status without folder", ("sweep", "status"), 2, "SWEEP_DIR"),
    Case("sweep run without spec", ("sweep", "run"), 2, "needs --config"),
    Case(
        "sweep grid as a list",
        ("sweep", "run", "--config", "{tmp}/sweep.yaml", "--executor", "debug"),
        2,
        "grid",
        setup=write("sweep.yaml", "grid:\n  - optim.lr\n"),
        absent=("{tmp}/sweeps",),
    ),
    Case(
        "paper config without weights",
        (
            "train",
            "--config",
            "{repo}/configs/attention_deeplab.yaml",
            "data.shards={shards}",
            "train.run_dir={tmp}/run",
        ),
        2,
        "model.init=imagenet needs model.pretrained_path",
        needs=("shards",),
        untouched=("{shards}",),
        absent=("{tmp}/run",),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case, check):
    check(case)
