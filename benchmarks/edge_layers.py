"""Edge conv layer by layer: forward+backward time of each padded convolution of a model, as the plain conv of its
geometry and under each of edge's plans, on the input size that layer gets in the model. Where edge's time goes,
and which plan "auto" picks for each size.

    python -m benchmarks.edge_layers [--model segmentation|resnet50] [--preset cpu|thesis] [--device auto|cpu|cuda]
                                     [--batch N] [--height PX] [--rounds N] [--warmup N] [--amp] [--channels-last]

`segmentation` (the default) is the segmentation task's model of `--preset` at H x 2H, `resnet50` torchvision's
ResNet50 at H x H (224 by default). The defaults follow `benchmarks.segmentation` and `benchmarks.convs`: on a CPU
the `cpu` model at 64 x 128, batch 8; on a GPU the `thesis` model at 512 x 1024, batch 4 (ResNet50: batch 64), in
bf16 autocast and channels_last (`--no-amp`, `--no-channels-last` turn them off). Each layer's cases run
interleaved round-robin, medians.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import convs
from benchmarks.common import add_gpu_format_options, describe, gpu_formats, interleaved, median, pick_device, table
from orchestrator.cli import ArgumentParser, CliError
from orchestrator.loop import keep_freed_memory
from tasks import get_task

STRATEGIES = ("auto", "strips", "boxes", "columns")


def build(name: str, batch: int, height: int, preset: str = "cpu") -> tuple[nn.Module, tuple[int, ...]]:
    """The edge-converted model and its input shape."""
    if name == "segmentation":
        task = get_task("segmentation")
        if preset not in task.presets:
            raise CliError(f"unknown segmentation preset {preset!r}; choose from {', '.join(task.presets)}")
        model = task.build_model(task.presets[preset], num_classes=19)
        shape = (batch, 3, height, 2 * height)
    else:
        model = torchvision.models.resnet50()
        shape = (batch, 3, height, height)
    convs.convert(model, "edge")
    return model, shape


def padded_layers(model: nn.Module, x: torch.Tensor) -> list[tuple[str, convs.EdgeConv2d, torch.Size]]:
    """Every edge layer with region filters, in the order the forward pass meets them, with its input's shape."""
    seen: dict[str, tuple[convs.EdgeConv2d, torch.Size]] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, _) -> None:
            seen.setdefault(name, (module, inputs[0].shape))

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, convs.EdgeConv2d) and module.region_weight is not None
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [(name, layer, shape) for name, (layer, shape) in seen.items()]


def cases(
    layer: convs.EdgeConv2d, shape: torch.Size, device: torch.device, *, amp: bool = False, channels_last: bool = False
) -> dict:
    """One forward+backward per case: the plain conv of the layer's geometry, and the layer under each plan."""
    x = torch.randn(shape, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    with autocast():
        grad = torch.randn_like(layer(x))

    def plain() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with autocast():
            out = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        out.backward(grad)

    def edge(strategy: str):
        def step() -> None:
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer.strategy = strategy
            with autocast():
                out = layer(x)
            out.backward(grad)

        return step

    return {"plain": plain, **{strategy: edge(strategy) for strategy in STRATEGIES}}


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m benchmarks.edge_layers", description=__doc__)
    parser.add_argument("--model", choices=("segmentation", "resnet50"), default="segmentation")
    parser.add_argument(
        "--preset", default=None, help="the segmentation model's preset (default: thesis on a GPU, else cpu)"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 8 on CPU; on GPU 4, resnet50: 64)")
    parser.add_argument(
        "--height", type=int, default=None, help="input height (default 64 on CPU, 512 on GPU; resnet50: 224)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds per layer (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    add_gpu_format_options(parser)
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the training loop does
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    resnet = args.model == "resnet50"
    batch = args.batch if args.batch is not None else (64 if resnet else 4) if gpu else 8
    height = args.height if args.height is not None else 224 if resnet else 512 if gpu else 64
    preset = args.preset or ("thesis" if gpu else "cpu")
    for flag, value, low in (("--batch", batch, 1), ("--rounds", args.rounds, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            raise CliError(f"{flag} must be at least {low}, got {value}")
    amp, channels_last = gpu_formats(args, device)
    model, shape = build(args.model, batch, height, preset)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    layers = padded_layers(model, torch.randn(shape, device=device))
    rows, totals = [], dict.fromkeys(["plain", *STRATEGIES], 0.0)
    for name, layer, inp in layers:
        steps = cases(layer, inp, device, amp=amp, channels_last=channels_last)
        timed = interleaved(steps, rounds=args.rounds, warmup=args.warmup, device=device)
        times = {k: median(v) for k, v in timed.items()}
        del layer.strategy  # back to the class's "auto"
        for key, value in times.items():
            totals[key] += value
        plan = layer.plan(inp[2], inp[3], cpu=device.type == "cpu").strategy
        geometry = f"{layer.kernel_size[0]}x{layer.kernel_size[1]} s{layer.stride[0]} d{layer.dilation[0]}"
        cells = [f"{times[s] * 1e3:.2f} ({times[s] / times['plain']:.1f}x)" for s in STRATEGIES]
        share = f"{layer.border_share(inp[2], inp[3]):.0%}"
        rows.append([name, " x ".join(map(str, inp[1:])), geometry, share, plan, f"{times['plain'] * 1e3:.2f}", *cells])
    cells = [f"{totals[s] * 1e3:.1f} ({totals[s] / totals['plain']:.1f}x)" for s in STRATEGIES]
    rows.append(["all", "", "", "", "", f"{totals['plain'] * 1e3:.1f}", *cells])
    print(
        f"\nEdge conv per padded layer of {args.model}{'' if resnet else f' ({preset})'}, "
        f"input {' x '.join(map(str, shape))}, amp={amp}, channels_last={channels_last}: forward+backward ms "
        f"(ratio to the plain conv), {args.rounds} interleaved rounds (median)"
    )
    print(f"device: {describe(device)}\n")
    header = ["layer", "input (C x H x W)", "kernel", "border", "auto plan", "plain", *STRATEGIES]
    print(table(header, rows))


if __name__ == "__main__":
    main()
