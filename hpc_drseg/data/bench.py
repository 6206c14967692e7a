"""`drseg bench data`: how many augmented training samples per second the CPUs deliver (a benchmark, not a test);
`drseg bench masks`: what each mask-resize rule of `drseg shard` does to lesion area and microaneurysms.

Layers: (a) augmentation alone per image on one core, per preset, plus what each paper transform costs when it fires
and on average; (b) the whole train loader (shard read + PNG decode + augment + collate) for 1..N workers; (c) the
on-device path (data.augment.where=device: decoded set on the device, augmented there in batches) beside it.
Goal (Jithesh et al. at 512²): the paper preset sustains >= 60 samples/s per core, i.e. a 16-core node feeds >= 1000/s.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import albumentations as A
import cv2
import numpy as np
import torch

from hpc_drseg.config import AugmentConfig
from hpc_drseg.config.choices import AUGMENT_PRESETS, MASK_RESIZE_RULES
from hpc_drseg.constants import LESIONS
from hpc_drseg.data.augment import Augment, build_augment
from hpc_drseg.errors import InputError, MissingError

# Lesion area after resizing, as a multiple of the area-true value, that the default mask-resize rule must stay within
# for every lesion type (checked by `drseg bench masks` and the tests).
AREA_RATIO_BOUNDS = (0.75, 1.33)
GOAL_PER_CORE = 60.0  # samples/s per core for the paper preset at 512² (16 cores × 60 ≈ 1000/s)
_TEST_IMAGES = 4  # distinct synthetic images cycled through, so no single image's content decides the figure


def _rate(samples: int, seconds: Optional[float]) -> Optional[float]:
    if seconds is None:
        return None
    return samples / seconds if seconds > 0 else float("inf")


def _row(
    layer: str, name: str, workers: int, samples: int, seconds: float, cpu_seconds: Optional[float] = None
) -> dict[str, Any]:
    """One measurement. Layer (a) runs on one core, so its CPU time is that core's busy time: samples_per_cpu_s is
    the per-core figure even when other processes share the machine (wall-clock rates then drop, CPU rates barely)."""
    rate, cpu_rate = _rate(samples, seconds), _rate(samples, cpu_seconds)
    per_core = cpu_rate if cpu_rate is not None else rate
    return {
        "layer": layer,
        "name": name,
        "workers": workers,
        "samples": samples,
        "seconds": round(seconds, 3),
        "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 3),
        "samples_per_s": rate,
        "per_worker_per_s": rate / max(1, workers),
        "samples_per_cpu_s": cpu_rate,
        "ms_per_sample": 1000.0 / per_core if per_core else float("inf"),
        "p": None,
        "expected_ms": None,
    }


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Per-core figures need OpenCV and torch (the elastic blur's matrix products) single-threaded, as they are in
    loader workers (DataLoader gives each one torch thread; pipeline.py makes their OpenCV serial)."""
    previous = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous[0])
        torch.set_num_threads(previous[1])


def make_test_samples(image_px: int, count: int = _TEST_IMAGES, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Synthetic fundus photos with lesion masks, (image H×W×3 uint8, mask H×W×4 uint8 0/1), as the shards hold them."""
    from hpc_drseg.data.fundus import render_fundus

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        image, masks = render_fundus(rng, image_px, image_px)
        mask = np.stack([masks[lesion] > 0 for lesion in LESIONS], axis=2).astype(np.uint8)
        samples.append((image, mask))
    return samples


def _time_calls(
    call: Callable[[np.ndarray, np.ndarray], Any], samples: list, seconds: float, min_calls: int
) -> tuple[int, float, float]:
    """Calls `call` over the samples (cycling) for `seconds` and at least `min_calls` times; (calls, wall s, CPU s)."""
    call(*samples[0])  # first call pays one-off costs (lazy imports, allocations)
    calls, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while calls < min_calls or time.perf_counter() - start < seconds:
        call(*samples[calls % len(samples)])
        calls += 1
    return calls, time.perf_counter() - start, time.process_time() - cpu_start


def bench_augment(preset: str, samples: list, seconds: float, seed: int = 0, stock: bool = False) -> dict[str, Any]:
    """(a) Samples/s of one preset on the calling core (decode excluded). `stock`: albumentations' own classes
    instead of the package's faster same-output ones (the baseline)."""
    image_px = samples[0][0].shape[0]
    aug = build_augment(AugmentConfig(preset=preset), image_px, seed=seed, stock=stock)
    call = aug if aug is not None else (lambda image, mask: (image, mask))
    name = f"{preset} (stock albumentations)" if stock else preset
    row = _row("augment", name, 1, *_time_calls(call, samples, seconds, min_calls=5))
    row["image_px"] = image_px
    return row


def _effective_probabilities(aug: Augment) -> Iterator[tuple[A.BasicTransform, float]]:
    """Each leaf transform with its overall firing probability (OneOf: block p × normalised weight)."""
    for t in aug.compose.transforms:
        if isinstance(t, A.OneOf):
            for member, weight in zip(t.transforms, t.transforms_ps):
                yield member, t.p * weight
        else:
            yield t, t.p


def _is_stock(transform: A.BasicTransform) -> bool:
    return type(transform).__module__.startswith("albumentations")


def profile_transforms(samples: list, seconds: float, seed: int = 0) -> list[dict[str, Any]]:
    """(a) Each paper transform forced on: ms when it fires, its probability, and its expected ms per sample; then,
    outside the paper's total, albumentations' own classes that the package replaces with same-output faster ones
    (layer 'stock', the baseline)."""
    image_px = samples[0][0].shape[0]
    paper = build_augment(AugmentConfig(preset="paper"), image_px, seed=seed)
    stock = build_augment(AugmentConfig(preset="paper"), image_px, seed=seed, stock=True)
    assert paper is not None and stock is not None
    replaced = {type(t).__mro__[1] for t, _ in _effective_probabilities(paper) if not _is_stock(t)}
    layered = [("transform", t, p) for t, p in _effective_probabilities(paper)]
    layered += [("stock", t, p) for t, p in _effective_probabilities(stock) if type(t) in replaced]
    rows = []
    for layer, transform, p in layered:

        def call(image: np.ndarray, mask: np.ndarray, t: A.BasicTransform = transform) -> Any:
            return t(image=image, mask=mask, force_apply=True)

        row = _row(layer, type(transform).__name__, 1, *_time_calls(call, samples, seconds, min_calls=3))
        row["p"], row["expected_ms"] = p, p * row["ms_per_sample"]
        rows.append(row)
    return rows


def bench_loader(shards_dir: str | Path, workers: int, seconds: float, preset: str, batch_size: int = 4) -> dict:
    """(b) Samples/s of the training loader of one rank with `workers` DataLoader workers (0 = main process).

    Timing starts when the first batch arrives, so worker start-up and the shuffle buffer's first fill are excluded.
    """
    from hpc_drseg.data.manifest import read_manifest
    from hpc_drseg.data.pipeline import build_train_loader

    image_px = int(read_manifest(shards_dir)["image_px"])
    aug = build_augment(AugmentConfig(preset=preset), image_px)
    loader = build_train_loader(
        shards_dir,
        split="train",
        batch_size=batch_size,
        rank=0,
        world_size=1,
        seed=0,
        epoch=0,
        num_workers=workers,
        augment=aug,
        steps=10**9,  # endless: the loop stops on the clock
    )
    samples, start = 0, None
    for batch in loader:
        if start is None:
            start = time.perf_counter()
            continue
        samples += int(batch.image.shape[0])
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start if start is not None else 0.0
    return _row("loader", f"{preset} @ {image_px}px", workers, samples, elapsed)


def bench_device(
    shards_dir: str | Path, seconds: float, preset: str, device: Optional[torch.device] = None, batch_size: int = 0
) -> dict[str, Any]:
    """(c) Samples/s of the on-device path (data.augment.where=device): the training set decoded onto `device`
    (default: CUDA if present, else the CPU) and augmented there a batch at a time; loading is excluded. The batch
    defaults to 32 on CUDA (the throughput goal's), 4 on the CPU (the loader rows')."""
    from hpc_drseg.data.device_augment.batches import build_device_batches

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = batch_size or (32 if device.type == "cuda" else 4)
    batches = build_device_batches(
        shards_dir, "train", batch_size, 0, 1, 0, AugmentConfig(preset=preset, where="device"), device, steps=10**9
    )
    stream = batches.epoch(0)
    next(stream)  # the first batch pays one-off costs (blur factors, kernel launches set-up): not timed
    _synchronize(device)
    samples, start = 0, time.perf_counter()
    for batch in stream:
        samples += len(batch.ids)
        if time.perf_counter() - start >= seconds:
            break
    _synchronize(device)
    row = _row(
        "device",
        f"{preset} @ {batches.train_set.images.shape[1]}px on {device.type}",
        0,
        samples,
        time.perf_counter() - start,
    )
    row["batch_size"] = batch_size
    return row


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_data(
    shards_dir: Optional[str | Path],
    workers: list[int],
    seconds: float,
    image_px: int = 512,
    preset: str = "paper",
) -> list[dict[str, Any]]:
    """Runs layer (a) at `image_px` for every preset and every paper transform, then layer (b) on `shards_dir` (if
    given) with the `preset` augmentation for each worker count. Returns one dict per measurement."""
    if seconds <= 0:
        raise InputError(f"--seconds: got {seconds}; it must be > 0")
    if any(w < 0 for w in workers):
        raise InputError(f"--workers: got {workers}; worker counts must be >= 0 (0 = main process)")
    if preset not in AUGMENT_PRESETS:
        raise InputError(f"--preset: got {preset!r}; choose one of {list(AUGMENT_PRESETS)}")
    if shards_dir is not None and not Path(shards_dir).is_dir():
        raise MissingError(f"--shards {shards_dir}: no such folder; run `drseg shard` first or leave it out")
    samples = make_test_samples(image_px)
    rows: list[dict[str, Any]] = []
    with _one_thread():
        rows += [bench_augment(name, samples, seconds) for name in AUGMENT_PRESETS]
        rows.append(bench_augment("paper", samples, seconds, stock=True))
        rows += profile_transforms(samples, max(seconds / 4, 0.2))
        if shards_dir is not None:
            rows += [bench_loader(shards_dir, w, seconds, preset) for w in workers]
            rows.append(bench_device(shards_dir, seconds, preset))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text report of `benchmark_data` rows, with the per-core goal verdict and the costliest transform.

    'wall/s' counts samples per wall-clock second; 'cpu/s' per second of this process's CPU time (layers a only);
    'ms/sample' is per core (from CPU time where measured); 'expected' = p × ms/sample.
    """
    lines = [
        f"{'layer':<10} {'setting':<40} {'workers':>7} {'wall/s':>9} {'/worker':>8} {'cpu/s':>8} {'ms/sample':>10}"
        f" {'expected':>9}"
    ]
    for r in rows:
        setting = r["name"] if r["p"] is None else f"{r['name']} (p={r['p']:.3f})"
        cpu = "" if r["samples_per_cpu_s"] is None else f"{r['samples_per_cpu_s']:.1f}"
        expected = "" if r["expected_ms"] is None else f"{r['expected_ms']:.2f}"
        lines.append(
            f"{r['layer']:<10} {setting:<40} {r['workers']:>7} {r['samples_per_s']:>9.1f} "
            f"{r['per_worker_per_s']:>8.1f} {cpu:>8} {r['ms_per_sample']:>10.2f} {expected:>9}"
        )
    return "\n".join(lines + _summary(rows))


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    paper = [r for r in rows if r["layer"] == "augment" and r["name"] == "paper"]
    if paper:
        rate = paper[0]["samples_per_cpu_s"] or paper[0]["samples_per_s"]
        verdict = "meets" if rate >= GOAL_PER_CORE else "MISSES"
        out.append(
            f"paper augmentation at {paper[0].get('image_px', '?')}px: {rate:.1f} samples/s per core "
            f"({1000 / rate:.1f} ms); {verdict} the goal of {GOAL_PER_CORE:.0f}/s per core"
        )
    stock = [r for r in rows if r["layer"] == "augment" and r["name"] == "paper (stock albumentations)"]
    if paper and stock:
        rate, base = (r["samples_per_cpu_s"] or r["samples_per_s"] for r in (paper[0], stock[0]))
        out.append(
            f"same output with stock albumentations classes: {base:.1f} samples/s per core; "
            f"the package's drop-in transforms are {rate / base:.2f}x that"
        )
    loaders, device = [r for r in rows if r["layer"] == "loader"], [r for r in rows if r["layer"] == "device"]
    if loaders and device:
        best = max(loaders, key=lambda r: r["samples_per_s"])
        out.append(
            f"input path: workers {best['samples_per_s']:.1f} img/s ({best['workers']} workers), on the device "
            f"{device[0]['samples_per_s']:.1f} img/s ({device[0]['name']}, batch {device[0]['batch_size']})"
        )
    transforms = [r for r in rows if r["layer"] == "transform"]
    if transforms:
        total = sum(r["expected_ms"] for r in transforms)
        top = max(transforms, key=lambda r: r["expected_ms"])
        out.append(
            f"costliest on average: {top['name']}, {top['expected_ms']:.2f} of {total:.2f} expected ms/sample "
            f"({top['ms_per_sample']:.1f} ms when it fires, p={top['p']:.3f})"
        )
    return out


# ------------------------------------------------------------------------------------------------- mask resizing
def mask_resize_stats(
    masks: Iterable[np.ndarray], image_px: int, rules: tuple[str, ...] = MASK_RESIZE_RULES
) -> list[dict[str, Any]]:
    """Per rule: each lesion's area after resizing to image_px² relative to its area-true value, and how many
    microaneurysms survive, over native (H, W, 4) 0/1 masks in LESIONS order.

    area_ratio[lesion] = Σ resized lesion px × (H·W / image_px²) ÷ Σ native lesion px (NaN without lesion pixels).
    A microaneurysm is a connected component of the native MA mask (8-connectivity); it survives when a target pixel
    whose footprint holds the centre of one of its pixels is MA, i.e. the MA mask still marks where it was (found by
    mapping the resized mask back to native size with centre-aligned nearest).
    """
    from hpc_drseg.data.resize import resize_mask

    ma = LESIONS.index("MA")
    native = np.zeros(len(LESIONS))
    scaled = {rule: np.zeros(len(LESIONS)) for rule in rules}
    kept = dict.fromkeys(rules, 0)
    components = images = 0
    for mask in masks:
        height, width = mask.shape[:2]
        images += 1
        native += mask.reshape(-1, len(LESIONS)).sum(axis=0)
        count, labels = cv2.connectedComponents(np.ascontiguousarray(mask[..., ma]), connectivity=8)
        components += count - 1
        for rule in rules:
            small = resize_mask(mask, image_px, rule)
            scaled[rule] += small.reshape(-1, len(LESIONS)).sum(axis=0) * (height * width / image_px**2)
            back = cv2.resize(small[..., ma], (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
            kept[rule] += len(np.unique(labels[(back > 0) & (labels > 0)]))
    rows = []
    for rule in rules:
        ratios = {
            lesion: float(scaled[rule][i] / native[i]) if native[i] else float("nan")
            for i, lesion in enumerate(LESIONS)
        }
        rows.append(
            {
                "rule": rule,
                "image_px": image_px,
                "images": images,
                "area_ratio": ratios,
                "ma_components": components,
                "ma_kept": kept[rule],
                "ma_kept_fraction": kept[rule] / components if components else float("nan"),
            }
        )
    return rows


def mask_resize_table(ddr_root: str | Path, image_px: int = 512) -> list[dict[str, Any]]:
    """`mask_resize_stats` over every sample of every split of a DDR tree (real or synthetic)."""
    from hpc_drseg.data.ddr import available_splits, find_samples, read_sample

    if image_px <= 0:
        raise InputError(f"--image-px: got {image_px}; it must be a positive number of pixels (e.g. 512)")
    files = [f for split in available_splits(ddr_root) for f in find_samples(ddr_root, split)]
    if not files:
        raise MissingError(f"--ddr-root {ddr_root}: the DDR tree holds no images")
    return mask_resize_stats((read_sample(f).masks for f in files), image_px)


def format_mask_resize_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `mask_resize_stats` rows, with the verdict on the default rule's area bounds."""
    lines = [
        f"{rows[0]['images']} images, {rows[0]['ma_components']} microaneurysms (native MA components), "
        f"masks resized to {rows[0]['image_px']} px; area = resized lesion area / area-true value",
        "",
        "| rule | " + " | ".join(f"area {lesion}" for lesion in LESIONS) + " | MA kept |",
        "|---|" + "---:|" * (len(LESIONS) + 1),
    ]
    for r in rows:
        areas = " | ".join(f"×{r['area_ratio'][lesion]:.2f}" for lesion in LESIONS)
        lines.append(f"| {r['rule']} | {areas} | {100 * r['ma_kept_fraction']:.1f} % |")
    default = next((r for r in rows if r["rule"] == MASK_RESIZE_RULES[0]), None)
    if default is not None:
        low, high = AREA_RATIO_BOUNDS
        inside = all(low <= value <= high for value in default["area_ratio"].values() if value == value)
        verdict = "within" if inside else "OUTSIDE"
        lines += [
            "",
            f"default rule `{default['rule']}`: lesion area {verdict} [{low}, {high}] of area-true for every lesion",
        ]
    return "\n".join(lines)
