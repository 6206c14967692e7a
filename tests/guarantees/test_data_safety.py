"""Guarantees, the user's data: `drseg shard` and `drseg synth` never delete or alter what they were not asked to
replace (the input tree, a folder around or inside it, an unrelated folder, a file, a symlink's target), replace with
--overwrite only their own previous output, remove the temporaries of a killed earlier run of the same output and
nothing named like them; readers of a damaged manifest say which field of which file is wrong."""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from guarantees_harness import REPO, Case

SYNTH_SMALL = ("--train", "1", "--valid", "0", "--test", "0", "--size", "96", "--workers", "1", "--quiet")
SHARD_SMALL = ("--image-px", "64", "--workers", "1", "--quiet")
# A run killed by SIGKILL (a preempted job, the OOM killer) at the point where its temporary output is largest.
KILLED_SHARD_RUN = """
import os, signal, sys
from hpc_drseg.data import shards
real_add = shards._SplitWriter.add
def add_then_die(self, sample):
    real_add(self, sample)
    os.kill(os.getpid(), signal.SIGKILL)
shards._SplitWriter.add = add_then_die
shards.write_shards(sys.argv[1], sys.argv[2], image_px=64, workers=1, progress=False)
"""
KILLED_SYNTH_RUN = """
import os, signal, sys
from hpc_drseg.data import synth
synth._write_marker = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
synth.write_synthetic_ddr(sys.argv[1], {"train": 1}, 96, progress=False, workers=1)
"""

Setup = Callable[[Mapping[str, Path]], None]


def steps(*setups: Setup) -> Setup:
    def setup(paths) -> None:
        for step in setups:
            step(paths)

    return setup


def write(relative: str, text: str = "the user's own file\n") -> Setup:
    def setup(paths) -> None:
        target = Path(paths["tmp"]) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    return setup


def link(relative: str, key: str) -> Setup:
    """{tmp}/relative → the copy named `key` (ddr, shards)."""
    return lambda paths: (Path(paths["tmp"]) / relative).symlink_to(paths[key])


def copy(key: str, relative: str) -> Setup:
    return lambda paths: shutil.copytree(paths[key], Path(paths["tmp"]) / relative)


def unlink(relative: str) -> Setup:
    return lambda paths: (Path(paths["tmp"]) / relative).unlink()


def edit_manifest(**fields) -> Setup:
    """Sets top-level fields, or `split__field` of a split, in the shards' manifest.json."""

    def setup(paths) -> None:
        path = Path(paths["shards"]) / "manifest.json"
        manifest = json.loads(path.read_text())
        for key, value in fields.items():
            split, _, field = key.rpartition("__")
            (manifest["splits"][split] if split else manifest)[field] = value
        path.write_text(json.dumps(manifest, indent=1))

    return setup


@functools.cache
def _checkpoint_bytes(shards: str) -> bytes:
    """best.pt of an untrained debug model (made once: the eval cases only need one that loads)."""
    import torch

    from hpc_drseg.config import config_to_dict, load_config
    from hpc_drseg.models import build_model

    cfg = load_config(REPO / "configs" / "debug.yaml", [f"data.shards={shards}"])
    progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": []}
    buffer = io.BytesIO()
    torch.save(
        {"model": build_model(cfg.model).state_dict(), "config": config_to_dict(cfg), "progress": progress}, buffer
    )
    return buffer.getvalue()


def run_dir(paths) -> None:
    """{tmp}/run: config.yaml (debug, data.shards = the copy) and checkpoints/best.pt, as drseg train leaves it."""
    from hpc_drseg.config import load_config, save_config

    run = Path(paths["tmp"]) / "run"
    overrides = [f"data.shards={paths['shards']}", f"train.run_dir={run}"]
    save_config(load_config(REPO / "configs" / "debug.yaml", overrides), run / "config.yaml")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best.pt").write_bytes(_checkpoint_bytes(str(paths["shards"])))


def killed_run(script: str, out: str, *args: str) -> Setup:
    """Runs `script` (it kills itself mid-write) with args and {tmp}/out; paths["stale"] = the temporary it left,
    aged past the few seconds during which any temporary is left alone."""

    def setup(paths) -> None:
        target = Path(paths["tmp"]) / out
        argv = [sys.executable, "-c", script, *(str(paths[a]) for a in args), str(target)]
        done = subprocess.run(argv, cwd=paths["tmp"], capture_output=True, timeout=120)
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
        (stale,) = target.parent.glob(f".{target.name}.*.tmp")
        old = time.time() - 600
        os.utime(stale, (old, old))
        paths["stale"] = stale  # type: ignore[index]

    return setup


SHARD = ("shard", "--ddr-root", "{ddr}")
SYNTH = ("synth",)
CASES = [
    # ---------------------------------------------------------------- drseg shard: --out overlapping the input
    Case(
        "shard out is the ddr tree",
        (*SHARD, "--out", "{ddr}", "--overwrite"),
        2,
        "--out {ddr} is the input --ddr-root {ddr}",
        untouched=("{ddr}",),
        needs=("ddr",),
    ),
    Case(
        "shard out contains the ddr tree",
        (*SHARD, "--out", "{tmp}", "--overwrite"),
        2,
        "--out {tmp} contains the input --ddr-root {ddr}",
        untouched=("{ddr}",),
        needs=("ddr",),
    ),
    Case(
        "shard out inside the ddr tree",
        (*SHARD, "--out", "{ddr}/shards"),
        2,
        "--out {ddr}/shards lies inside the input --ddr-root {ddr}",
        untouched=("{ddr}",),
        needs=("ddr",),
        absent=("{ddr}/shards",),
    ),
    Case(
        "shard overwrite a split of the ddr tree",
        (*SHARD, "--out", "{ddr}/lesion_segmentation/test", "--overwrite"),
        2,
        "--out {ddr}/lesion_segmentation/test lies inside the input --ddr-root {ddr}",
        untouched=("{ddr}",),
        needs=("ddr",),
    ),
    Case(
        "shard out a symlink to the ddr tree",
        (*SHARD, "--out", "{tmp}/link", "--overwrite"),
        2,
        "--out {tmp}/link is the input --ddr-root {ddr}",
        untouched=("{ddr}", "{tmp}/link"),
        setup=link("link", "ddr"),
        needs=("ddr",),
    ),
    # ---------------------------------------------------------------- drseg shard: what --overwrite may replace
    Case(
        "shard overwrite an unrelated folder",
        (*SHARD, "--out", "{tmp}/thesis", "--overwrite", *SHARD_SMALL),
        2,
        "--out {tmp}/thesis exists and is not a shard folder written by drseg shard",
        untouched=("{tmp}/thesis", "{ddr}"),
        setup=steps(write("thesis/chapter1.tex"), write("thesis/figures/fig1.pdf")),
        needs=("ddr",),
    ),
    Case(
        "shard overwrite a regular file",
        (*SHARD, "--out", "{tmp}/notes.txt", "--overwrite", *SHARD_SMALL),
        2,
        "--out {tmp}/notes.txt is a file, not a folder",
        untouched=("{tmp}/notes.txt", "{ddr}"),
        setup=write("notes.txt"),
        needs=("ddr",),
    ),
    Case(
        "shard overwrite a symlink to shards",
        (*SHARD, "--out", "{tmp}/current", "--overwrite", *SHARD_SMALL),
        2,
        "--out {tmp}/current is a symlink (to {shards})",
        untouched=("{tmp}/current", "{shards}", "{ddr}"),
        setup=link("current", "shards"),
        needs=("ddr", "shards"),
    ),
    Case(
        "shard overwrite shards holding a user file",
        (*SHARD, "--out", "{shards}", "--overwrite", *SHARD_SMALL),
        2,
        "it holds notes.md, which drseg shard does not write",
        untouched=("{shards}", "{ddr}"),
        setup=write("shards/notes.md"),
        needs=("ddr", "shards"),
    ),
    Case(
        "shard overwrite its previous output",
        (*SHARD, "--out", "{shards}", "--overwrite", *SHARD_SMALL),
        0,
        untouched=("{ddr}",),
        needs=("ddr", "shards"),
        absent=("{shards}/train-000001.tar",),  # 2 samples per shard before, 16 now: replaced, not merged
    ),
    Case(
        "shard removes a killed run's temporary only",
        (*SHARD, "--out", "{tmp}/out", *SHARD_SMALL),
        0,
        untouched=("{tmp}/.out.notes.tmp", "{tmp}/.out.tmp-1a2b3c4d", "{tmp}/.out-2.tmp", "{ddr}"),
        setup=steps(
            killed_run(KILLED_SHARD_RUN, "out", "ddr"),
            write(".out.notes.tmp"),
            write(".out.tmp-1a2b3c4d/train-000000.tar"),
            write(".out-2.tmp"),
        ),
        needs=("ddr",),
        absent=("{stale}",),
    ),
    # ---------------------------------------------------------------- drseg synth: what --overwrite may replace
    Case(
        "synth overwrite an unrelated folder",
        (*SYNTH, "--out", "{tmp}/photos", "--overwrite", *SYNTH_SMALL),
        2,
        "--out {tmp}/photos exists and is not a tree written by drseg synth (no .hpc_drseg-synth.json in it)",
        untouched=("{tmp}/photos",),
        setup=steps(write("photos/holiday.jpg"), write("photos/lesion_segmentation/readme.txt")),
    ),
    Case(
        "synth overwrite a regular file",
        (*SYNTH, "--out", "{tmp}/notes.txt", "--overwrite", *SYNTH_SMALL),
        2,
        "--out {tmp}/notes.txt is a file, not a folder",
        untouched=("{tmp}/notes.txt",),
        setup=write("notes.txt"),
    ),
    Case(
        "synth overwrite a real ddr copy",
        (*SYNTH, "--out", "{ddr}", "--overwrite", *SYNTH_SMALL),
        2,
        "--out {ddr} exists and is not a tree written by drseg synth (no .hpc_drseg-synth.json in it)",
        untouched=("{ddr}",),
        setup=unlink("DDR-dataset/.hpc_drseg-synth.json"),  # the DDR layout without the marker: real data
        needs=("ddr",),
    ),
    Case(
        "synth overwrite a synth tree holding shards",
        (*SYNTH, "--out", "{ddr}", "--overwrite", *SYNTH_SMALL),
        2,
        "it holds shards, which drseg synth does not write",
        untouched=("{ddr}",),
        setup=copy("shards", "DDR-dataset/shards"),
        needs=("ddr", "shards"),
    ),
    Case(
        "synth overwrite a symlink to a synth tree",
        (*SYNTH, "--out", "{tmp}/link", "--overwrite", *SYNTH_SMALL),
        2,
        "--out {tmp}/link is a symlink (to {ddr})",
        untouched=("{tmp}/link", "{ddr}"),
        setup=link("link", "ddr"),
        needs=("ddr",),
    ),
    Case(
        "synth existing without overwrite",
        (*SYNTH, "--out", "{ddr}", *SYNTH_SMALL),
        2,
        "{ddr} already exists; pass --overwrite",
        untouched=("{ddr}",),
        needs=("ddr",),
    ),
    Case(
        "synth overwrite its previous tree",
        (*SYNTH, "--out", "{ddr}", "--overwrite", *SYNTH_SMALL),
        0,
        untouched=("{tmp}/DDR-dataset.bak", "{tmp}/.DDR-dataset.old"),  # the user's, named like the tree
        setup=steps(copy("ddr", "DDR-dataset.bak"), write(".DDR-dataset.old/keep.txt")),
        needs=("ddr",),
        absent=("{ddr}/lesion_segmentation/test",),  # --test 0 now: replaced, not merged
    ),
    Case(
        "synth removes a killed run's temporary only",
        (*SYNTH, "--out", "{tmp}/ddr", *SYNTH_SMALL),
        0,
        untouched=("{tmp}/.ddr.notes.tmp", "{tmp}/.ddr.tmp-1a2b3c4d"),
        setup=steps(
            killed_run(KILLED_SYNTH_RUN, "ddr"),
            write(".ddr.notes.tmp"),
            write(".ddr.tmp-1a2b3c4d/lesion_segmentation/x.jpg"),
        ),
        absent=("{stale}",),
    ),
    # ---------------------------------------------------------------- readers: a damaged manifest
    Case(
        "eval manifest images as a string",
        ("eval", "--run", "{tmp}/run"),
        2,
        "{shards}/manifest.json: field 'splits.test.images' must be an integer >= 0, got '4' (str)",
        untouched=("{shards}", "{tmp}/run/checkpoints", "{tmp}/run/config.yaml"),
        setup=steps(edit_manifest(test__images="4"), run_dir),
        needs=("shards",),
        absent=("{tmp}/run/eval_test.json",),
    ),
    Case(
        "eval split not in the shards",
        ("eval", "--run", "{tmp}/run", "--split", "val"),
        2,
        "split 'val' is not in the shards {shards}; available: ['test', 'train', 'valid']",
        untouched=("{shards}", "{tmp}/run/checkpoints"),
        setup=run_dir,
        needs=("shards",),
        absent=("{tmp}/run/eval_val.json",),
    ),
    Case(
        "bench data manifest image_px as a string",
        ("bench", "data", "--shards", "{shards}", "--workers", "0", "--seconds", "0.01", "--image-px", "64"),
        2,
        "{shards}/manifest.json: field 'image_px' must be a positive integer, got '128' (str)",
        untouched=("{shards}",),
        setup=edit_manifest(image_px="128"),
        needs=("shards",),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_data_safety(case, check):
    check(case)
