"""`drseg synth` (synthetic DDR or IDRiD trees) and `drseg shard` (DDR, IDRiD or folder dataset → WebDataset shards)."""

from __future__ import annotations

import argparse

from hpc_drseg.cli.common import add_command
from hpc_drseg.config.choices import IMAGE_CODECS, MASK_RESIZE_RULES
from hpc_drseg.constants import SPLITS
from hpc_drseg.errors import InputError

DDR_COUNTS = (383, 149, 225)  # images per split of DDR's lesion-segmentation subset, in SPLITS order


def cmd_synth(args: argparse.Namespace) -> int:
    from hpc_drseg.data.synth import DDR_COUNTS, write_synthetic_ddr
    from hpc_drseg.data.synth_idrid import IDRID_COUNTS, write_synthetic_idrid

    idrid = args.layout == "idrid"
    write, defaults = (write_synthetic_idrid, IDRID_COUNTS) if idrid else (write_synthetic_ddr, DDR_COUNTS)
    given = {split: getattr(args, split) for split in SPLITS if getattr(args, split) is not None}
    counts = {**{split: n for split, n in defaults.items() if split not in given}, **given}
    out = write(
        args.out,
        counts=counts,
        size_px=args.size,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
        workers=args.workers,
    )
    print(f"synthetic {'IDRiD' if idrid else 'DDR'} tree written to {out} ({sum(counts.values())} images)")
    return 0


def add_synth(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "synth", cmd_synth, help="write synthetic DDR-like data in the official layout")
    p.add_argument("--out", required=True, help="output folder (gets lesion_segmentation/{train,valid,test}/…)")
    p.add_argument(
        "--layout",
        default="ddr",
        choices=("ddr", "idrid"),
        help="ddr (default) or idrid: IDRiD's 'A. Segmentation/…' tree, 0/255 .tif masks, absent files for absent "
        "lesions, 54/27 train/test images by default, no valid set",
    )
    for split, default in zip(SPLITS, DDR_COUNTS):
        p.add_argument(f"--{split}", type=int, default=None, help=f"{split} images (default {default}, as DDR)")
    p.add_argument("--size", type=int, default=1024, help="nominal image side in px; sides vary ±15%% (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all usable cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _shard_source(args: argparse.Namespace):
    """The dataset reader of `drseg shard`: --ddr-root DIR (the DDR form) or --layout L --root DIR."""
    from hpc_drseg.data.layouts import DEFAULT_VALID_FRACTION, build_reader

    if (args.ddr_root is None) == (args.root is None):
        raise InputError("give either --ddr-root DIR (a DDR tree) or --layout LAYOUT --root DIR")
    if args.ddr_root is not None and args.layout not in (None, "ddr"):
        raise InputError(f"--ddr-root reads the DDR layout; for --layout {args.layout} give the folder as --root")
    layout = args.layout or "ddr"
    only = {"idrid": ("valid_fraction", "split_seed"), "folders": ("mask_pattern", "split", "dataset_name")}
    for other, options in only.items():
        given = [f"--{o.replace('_', '-')}" for o in options if getattr(args, o) is not None]
        if given and layout != other:
            raise InputError(f"{', '.join(given)}: only for --layout {other} (got --layout {layout})")
    valid_fraction = DEFAULT_VALID_FRACTION if args.valid_fraction is None else args.valid_fraction
    return build_reader(
        layout,
        args.ddr_root if args.ddr_root is not None else args.root,
        allow_missing_masks=args.allow_missing_masks,
        valid_fraction=valid_fraction,
        split_seed=args.split_seed or 0,
        mask_pattern=args.mask_pattern,
        split=args.split,
        dataset=args.dataset_name,
    )


def cmd_shard(args: argparse.Namespace) -> int:
    from hpc_drseg.data.shards import write_shards

    manifest = write_shards(
        _shard_source(args),
        args.out,
        image_px=args.image_px,
        overwrite=args.overwrite,
        allow_missing_masks=args.allow_missing_masks,
        workers=args.workers,
        progress=not args.quiet,
        image_codec=args.image_codec,
        mask_resize=args.mask_resize,
    )
    for split, info in manifest["splits"].items():
        lesions = " ".join(f"{k}={v}" for k, v in info["lesion_images"].items())
        print(f"{split:>5}: {info['images']:4d} images in {len(info['shards'])} shards; images with lesion: {lesions}")
    print(
        f"dataset {manifest['dataset']} (layout {manifest['layout']}); masks resized by rule "
        f"'{manifest['mask_resize']}'; shards written to {args.out} (manifest.json)"
    )
    return 0


def add_shard(sub: argparse._SubParsersAction) -> None:
    from hpc_drseg.data.layouts import DEFAULT_VALID_FRACTION, LAYOUTS

    p = add_command(sub, "shard", cmd_shard, help="convert a DDR, IDRiD or folder dataset into WebDataset shards")
    p.add_argument("--ddr-root", default=None, help="DDR: folder holding lesion_segmentation/ (or that folder itself)")
    p.add_argument("--layout", default=None, choices=LAYOUTS, help="layout of --root (docs/datasets.md)")
    p.add_argument("--root", default=None, help="dataset folder of --layout (ddr, idrid: 'A. Segmentation' or above)")
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=None,
        help=f"idrid: share of training images made the valid split (default {DEFAULT_VALID_FRACTION}; 0 = none)",
    )
    p.add_argument("--split-seed", type=int, default=None, help="idrid: seed of the valid split's draw (default 0)")
    p.add_argument("--mask-pattern", default=None, help="folders: mask file name, default '{stem}.png'")
    p.add_argument("--split", default=None, choices=SPLITS, help="folders: split of a single images/ (default test)")
    p.add_argument("--dataset-name", default=None, help="folders: name in manifest and reports (default: folder name)")
    p.add_argument("--out", required=True, help="shard folder to create (tars + manifest.json)")
    p.add_argument("--image-px", type=int, default=512, help="training image side (default 512, the paper's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard folder")
    p.add_argument("--allow-missing-masks", action="store_true", help="treat a missing mask file as all-zero")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all usable cores)")
    p.add_argument(
        "--image-codec",
        default=IMAGE_CODECS[0],
        choices=IMAGE_CODECS,
        help="training images as PNG (default, 2.4x smaller) or raw .npy (decode ~40x cheaper; for CPU-bound nodes)",
    )
    p.add_argument(
        "--mask-resize",
        default=MASK_RESIZE_RULES[0],
        choices=MASK_RESIZE_RULES,
        help="how masks shrink to --image-px: nearest (default, the paper code's; lesion area kept on average), area "
        "(lesion where it covers >= half a target pixel), any (lesion where any source pixel is: keeps every "
        "microaneurysm but inflates lesion area, MA x2-3); compare them with `drseg bench masks`",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
