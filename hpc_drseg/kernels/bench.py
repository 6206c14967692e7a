"""`drseg bench cbam`: one CBAM block (Woo et al. 2018, as in Attention-DeepLab) timed for eager, torch.compile and the
fused Triton kernel at the paper's shapes — forward and forward+backward by CUDA-graph replay (launch cost as in a
captured training step, not Python issue time), GPU kernels per forward+backward from torch.profiler, achieved GB/s
against a device-to-device copy — and the Attention-DeepLab training step in img/s with CBAM impl=eager vs triton.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from hpc_drseg.config import load_config
from hpc_drseg.constants import LESIONS
from hpc_drseg.errors import InputError
from hpc_drseg.losses import build_loss
from hpc_drseg.models import CBAM, build_model
from hpc_drseg.models.cbam import CBAM_IMPLS, active_impl, cbam_eager, cbam_forward, triton_unavailable_reason

# (C, H, W) of the two CBAM sites at 512² input: after ASPP at output stride 32 and 16, after the low-level projection
PAPER_SHAPES: tuple[tuple[int, int, int], ...] = ((256, 16, 16), (256, 32, 32), (48, 128, 128))
PAPER_BATCH_SIZES: tuple[int, ...] = (4, 16)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The fewest bytes any implementation moves, in units of x's size: forward reads x, writes out; backward reads the
# upstream gradient and x, writes dx. GB/s below are these bytes over the measured time.
FWD_PASSES, FWD_BWD_PASSES = 2, 5
COPY_BYTES = {"cuda": 2**28, "cpu": 2**26}  # copy source size: 256 MiB (several times an H100/H200 L2) on a GPU


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'256x16x16,48x128x128' → [(256, 16, 16), (48, 128, 128)] (C×H×W), for the CLI's --shapes."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise InputError(f"--shapes: got {item!r}; write C×H×W triples like 256x16x16,48x128x128")
        shapes.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return shapes


def benchmark_cbam(
    shapes: Sequence[tuple[int, int, int]] = PAPER_SHAPES,
    batch_sizes: Sequence[int] = PAPER_BATCH_SIZES,
    dtype: torch.dtype | str = torch.bfloat16,
    channels_last: bool = True,
    impls: Sequence[str] = CBAM_IMPLS,
    *,
    warmup: int = 10,
    iters: int = 50,
    input_sets: int = 8,
    train_step: bool = True,
    train_batch: int = 16,
    train_image_px: int = 512,
    train_steps: int = 20,
    train_warmup: int = 3,
    train_overrides: Sequence[str] = (),
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Rows of kind "copy", "cbam" (one per shape × batch × impl) and "train_step" (per impl in eager/triton).

    CUDA: one CUDA graph per configuration holding one call per input set (`input_sets` random sets), captured after
    `warmup` calls; the median of `iters` replays, per call; `kernels_fwd_bwd` from torch.profiler. CPU (no CUDA):
    host clock around eager calls, median of `iters`, no kernel count (None), for eager and compile only — "triton"
    rows are marked skipped (the CPU interpreter is for tests), so the figures say nothing about GPU speed.
    The training step (median of `train_steps` after `train_warmup`): Attention-DeepLab from load_config(None,
    [model.cbam.impl=…, data.image_px=…, *train_overrides]), a random batch, Adam, bf16 autocast, channels_last, the
    configured loss.
    """
    dev, dtype = _resolve_device(device), _resolve_dtype(dtype)
    unknown = sorted(set(impls) - set(CBAM_IMPLS))
    if unknown:
        raise InputError(f"bench cbam: unknown impls {unknown}; choose from {list(CBAM_IMPLS)}")
    if dev.type != "cuda":
        log("bench cbam: no CUDA device — host-clock timings on CPU, impl=triton skipped; not the GPU figures")
    copy = _copy_row(dev, warmup, iters)
    log(f"device-to-device copy: {copy['gbps']:.1f} GB/s")
    rows = [copy]
    for channels, height, width in shapes:
        for batch in batch_sizes:
            shape = (batch, channels, height, width)
            rows += _cbam_rows(
                shape=shape,
                dtype=dtype,
                channels_last=channels_last,
                impls=impls,
                device=dev,
                copy_gbps=copy["gbps"],
                warmup=warmup,
                iters=iters,
                sets=input_sets,
                log=log,
            )
    if train_step:
        for impl in [i for i in ("eager", "triton") if i in impls]:
            row = _train_row(
                impl=impl,
                batch=train_batch,
                image_px=train_image_px,
                overrides=train_overrides,
                device=dev,
                warmup=train_warmup,
                steps=train_steps,
            )
            rows.append(row)
            log(_describe_train(rows[-1]))
    return rows


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"bench cbam: device {device!r} asked for, but torch sees no CUDA device; use device='cpu'")
    return dev


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"bench cbam: dtype {dtype!r}; choose one of {list(DTYPES)}")
    return DTYPES[dtype]


def _median_ms(fn: Callable[[int], object], warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds of fn(i) over `iters` calls after `warmup` calls (i selects the input set)."""
    for i in range(warmup):
        fn(i)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(i)
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for i in range(iters):
            started = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def _graph_ms(fn: Callable[[int], object], sets: int, warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds of fn(i) per call, from `iters` replays of one CUDA graph that holds fn(0) … fn(sets − 1)
    (captured after `warmup` calls on a side stream, so compilation and allocator warm-up stay outside)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for i in range(max(warmup, sets)):
            fn(i)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(sets):
            fn(i)
    graph.replay()
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events) / sets


def _time_pair(
    forward: Callable[[int], object],
    forward_backward: Callable[[int], object],
    sets: int,
    warmup: int,
    iters: int,
    device: torch.device,
) -> tuple[tuple[float, float], str]:
    """((fwd ms, fwd+bwd ms), how they were timed): CUDA-graph replay on CUDA, eager calls where a graph cannot be
    captured (the reason goes into the row) and on CPU."""
    if device.type == "cuda":
        try:
            graph = tuple(_graph_ms(fn, sets, warmup, iters, device) for fn in (forward, forward_backward))
            return graph, "cuda-graph replay"
        except RuntimeError as exc:  # e.g. an op that synchronises cannot be captured
            torch.cuda.synchronize(device)
            reason = f"eager, CUDA events (graph capture failed: {str(exc).splitlines()[0][:80]})"
            return tuple(_median_ms(fn, warmup, iters, device) for fn in (forward, forward_backward)), reason
    return tuple(_median_ms(fn, warmup, iters, device) for fn in (forward, forward_backward)), "host clock, eager"


def count_kernels(step: Callable[[], object], device: torch.device) -> int | None:
    """GPU work items (kernels, memsets, memcpys) one call of `step` issues, counted with torch.profiler after one
    warm-up call; None on a device without them (CPU: not applicable)."""
    if device.type != "cuda":
        return None
    step()
    torch.cuda.synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize(device)
    # GPU-timeline events, less the GPU spans of record_function annotations (autograd and user ranges)
    return sum(
        1
        for event in prof.events()
        if event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
    )


def triton_launches_per_step(x: Tensor, weights: Sequence[Tensor], upstream: Tensor) -> int:
    """Triton kernel launches of one forward+backward of the fused CBAM (the kernels' own launch counter: also works
    in Triton's CPU interpreter, where the profiler sees no GPU kernels)."""
    from hpc_drseg.kernels.cbam_launch import count_launches

    inputs = [t.detach().requires_grad_(True) for t in (x, *weights)]
    with count_launches() as launches:
        torch.autograd.grad(cbam_forward(inputs[0], *inputs[1:], impl="triton"), inputs, upstream)
    return sum(launches.values())


def _copy_row(device: torch.device, warmup: int, iters: int) -> dict[str, Any]:
    nbytes = COPY_BYTES["cuda" if device.type == "cuda" else "cpu"]
    src = torch.randn(nbytes // 4, device=device)  # random, not zeros: zeros can run faster than real data
    dst = torch.empty_like(src)
    ms = _median_ms(lambda _: dst.copy_(src), warmup, iters, device)
    moved = 2 * nbytes  # read + written
    return {"kind": "copy", "device": _device_name(device), "bytes": moved, "ms": ms, "gbps": moved / ms / 1e6}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _inputs(
    shape: tuple[int, ...], *, dtype: torch.dtype, channels_last: bool, device: torch.device, sets: int
) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
    """`sets` pairs (x, upstream gradient) of fresh random data and the fp32 weights of one CBAM (as in training)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    pairs = []
    for _ in range(sets):
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
        pairs.append((x, torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)))
    module = CBAM(shape[1]).to(device)
    return pairs, [p.detach().requires_grad_(True) for p in module.parameters()]


def _impl_fn(impl: str) -> Callable[..., Tensor]:
    if impl == "compile":
        torch._dynamo.reset()  # a fresh static-shape compile per configuration: no recompile limit, no dynamic shapes
        return torch.compile(cbam_eager, dynamic=False)
    return lambda x, *w: cbam_forward(x, *w, impl=impl)  # type: ignore[arg-type]


def _cbam_rows(
    *,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    channels_last: bool,
    impls: Sequence[str],
    device: torch.device,
    copy_gbps: float,
    warmup: int,
    iters: int,
    sets: int,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    pairs, weights = _inputs(shape, dtype=dtype, channels_last=channels_last, device=device, sets=sets)
    nbytes = pairs[0][0].numel() * pairs[0][0].element_size()
    rows, eager_ms = [], None
    for impl in impls:
        row = {
            "kind": "cbam",
            "impl": impl,
            "batch": shape[0],
            "shape": shape[1:],
            "dtype": str(dtype).split(".")[-1],
            "channels_last": channels_last,
            "device": _device_name(device),
            "note": "",
        }
        skip = _skip_reason(impl, pairs[0][0])
        if skip is not None:
            rows.append({**row, "note": f"skipped: {skip}"})
            log(f"{_describe_config(row)} {impl}: skipped ({skip})")
            continue
        fn = _impl_fn(impl)

        def forward(i: int, fn: Callable[..., Tensor] = fn) -> None:
            fn(pairs[i % sets][0], *weights)

        def forward_backward(i: int, fn: Callable[..., Tensor] = fn) -> None:
            x, upstream = pairs[i % sets]
            torch.autograd.grad(fn(x, *weights), (x, *weights), upstream)  # no .grad accumulation pass

        (fwd_ms, fwd_bwd_ms), row["timing"] = _time_pair(forward, forward_backward, sets, warmup, iters, device)
        row["kernels_fwd_bwd"] = count_kernels(lambda fn=forward_backward: fn(0), device)
        eager_ms = fwd_bwd_ms if impl == "eager" else eager_ms
        row.update(
            fwd_ms=fwd_ms,
            fwd_bwd_ms=fwd_bwd_ms,
            fwd_gbps=FWD_PASSES * nbytes / fwd_ms / 1e6,
            fwd_bwd_gbps=FWD_BWD_PASSES * nbytes / fwd_bwd_ms / 1e6,
        )
        row["fwd_bwd_of_copy"] = row["fwd_bwd_gbps"] / copy_gbps
        row["speedup_vs_eager"] = eager_ms / fwd_bwd_ms if eager_ms else None
        rows.append(row)
        kernels = _fmt(row["kernels_fwd_bwd"], "d", " kernels")
        log(f"{_describe_config(row)} {impl}: fwd {fwd_ms:.4f} ms, fwd+bwd {fwd_bwd_ms:.4f} ms ({kernels})")
    return rows


def _skip_reason(impl: str, x: Tensor) -> str | None:
    if impl != "triton":
        return None
    if x.device.type != "cuda":
        return "needs CUDA (the CPU interpreter is for tests)"
    return None if active_impl("triton", x) == "triton" else triton_unavailable_reason(x)


def _train_row(
    *, impl: str, batch: int, image_px: int, overrides: Sequence[str], device: torch.device, warmup: int, steps: int
) -> dict[str, Any]:
    row = {
        "kind": "train_step",
        "impl": impl,
        "batch": batch,
        "image_px": image_px,
        "device": _device_name(device),
        "overrides": list(overrides),
        "note": "",
    }
    probe = torch.empty(1, device=device)
    skip = _skip_reason(impl, probe)
    if skip is not None:
        return {**row, "note": f"skipped: {skip}"}
    cfg = load_config(None, [f"model.cbam.impl={impl}", f"data.image_px={image_px}", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last).train()
    loss_fn = build_loss(cfg.loss).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    image = torch.randn(batch, 3, image_px, image_px, device=device).contiguous(memory_format=torch.channels_last)
    mask = (torch.rand(batch, len(LESIONS), image_px, image_px, device=device) > 0.99).float()

    def step(_: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            output = model(image)
            logits = output["logits"] if isinstance(output, dict) else output  # aux head: {"logits", "aux"}
            loss, _ = loss_fn(logits, mask, output.get("aux") if isinstance(output, dict) else None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ms = _median_ms(step, warmup, steps, device)
    model_name = f"{cfg.model.name} {cfg.model.backbone} OS{cfg.model.output_stride}"
    return {**row, "step_ms": ms, "img_per_s": batch / ms * 1e3, "model": model_name}


def _describe_config(row: dict[str, Any]) -> str:
    c, h, w = row["shape"]
    layout = "channels_last" if row["channels_last"] else "NCHW"
    return f"B={row['batch']} {c}×{h}×{w} {row['dtype']} {layout}"


def _describe_train(row: dict[str, Any]) -> str:
    if "img_per_s" not in row:
        return f"train step impl={row['impl']}: {row['note']}"
    return f"train step impl={row['impl']}: {row['step_ms']:.2f} ms, {row['img_per_s']:.1f} img/s ({row['model']})"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else format(value, spec) + suffix


def format_cbam_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown tables of `benchmark_cbam` rows: the copy baseline, CBAM per configuration, training steps."""
    lines = []
    for row in rows:
        if row["kind"] == "copy":
            copy = f"device-to-device copy {row['gbps']:.1f} GB/s ({row['bytes'] / 2**20:.0f} MiB read + written)"
            lines += [f"Device: {row['device']}; {copy}", ""]
    header = "| batch | C×H×W | dtype | layout | impl | fwd ms | fwd+bwd ms | fwd+bwd GB/s | of copy | vs eager | note"
    header += " | kernels fwd+bwd | timing"
    lines += [header + " |", "|---:|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for row in (r for r in rows if r["kind"] == "cbam"):
        c, h, w = row["shape"]
        lines.append(
            f"| {row['batch']} | {c}×{h}×{w} | {row['dtype']} | {'CL' if row['channels_last'] else 'NCHW'} | "
            f"{row['impl']} | {_fmt(row.get('fwd_ms'), '.4f')} | {_fmt(row.get('fwd_bwd_ms'), '.4f')} | "
            f"{_fmt(row.get('fwd_bwd_gbps'), '.3g')} | {_fmt(row.get('fwd_bwd_of_copy'), '.1%')} | "
            f"{_fmt(row.get('speedup_vs_eager'), '.2f', '×')} | {row['note']} | "
            f"{_fmt(row.get('kernels_fwd_bwd'), 'd')} | {row.get('timing', '')} |"
        )
    train = [r for r in rows if r["kind"] == "train_step"]
    if train:
        lines += ["", "| training step | batch | image px | ms | img/s | note |", "|---|---:|---:|---:|---:|---|"]
        for row in train:
            lines.append(
                f"| impl={row['impl']} | {row['batch']} | {row['image_px']} | {_fmt(row.get('step_ms'), '.2f')} | "
                f"{_fmt(row.get('img_per_s'), '.1f')} | {row.get('model', '')} {row['note']} |"
            )
    return "\n".join(lines)
