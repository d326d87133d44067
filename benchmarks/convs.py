"""Cost of each conv variant in a torchvision ResNet50: forward+backward time and memory, as ratios to zero padding.

    python -m benchmarks.convs [--device auto|cpu|cuda] [--batch N] [--size PX] [--rounds N] [--no-holes]

All models are measured interleaved in one run (round-robin), so machine noise hits them alike; medians are
reported. `partial (NVIDIA-style)` is a reference: the same layer computing NVIDIA's full-size ratio map on
every call, to show what the separable border-strip ratio saves. `... + holes` rows run the model through
`convs.Masked` with an occlusion mask (about 30% holes), against the same unmasked zero-padding baseline.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import convs
from benchmarks.common import (
    add_gpu_format_options,
    describe,
    gpu_formats,
    interleaved,
    median,
    peak_cuda_bytes,
    pick_device,
    saved_activation_bytes,
    table,
    verdict,
    with_baseline,
)
from orchestrator.cli import ArgumentParser
from orchestrator.loop import keep_freed_memory

# Targets: time of a forward+backward step relative to the zero-padding model (the foundation issue's; edge's is
# tighter since edge conv does exactly the multiply-adds of a plain conv, one filter per output position).
TIME_TARGETS = {"partial": 1.02, "gated": 2.1, "edge": 1.15}
# Targets: what autograd saves for backward (activations, parameters not counted) relative to zero padding.
SAVED_TARGETS = {"edge": 1.3}
NVIDIA_STYLE = "partial (NVIDIA-style)"
# Masked runs: row name -> (variant, convert options).
HOLES = {
    "partial + holes": ("partial", {}),
    "partial multi-channel + holes": ("partial", {"multi_channel": True}),
    "gated + holes": ("gated", {}),
    "affine + holes": ("affine", {}),
}


class NvidiaStylePartialConv2d(convs.PartialConv2d):
    """Padding mode computed as NVIDIA's PartialConv2d does: a full-size ratio map from a conv of a ones mask."""

    def _forward_padding(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            kh, kw = self.kernel_size
            ones = torch.ones(1, 1, *x.shape[-2:], device=x.device, dtype=x.dtype)
            count = F.conv2d(
                ones,
                torch.ones(1, 1, kh, kw, device=x.device, dtype=x.dtype),
                None,
                self.stride,
                self.padding,
                self.dilation,
            )
            update = count.clamp(0, 1)
            ratio = kh * kw / (count + 1e-8) * update
        raw = self._conv_forward(x, self.weight, None)
        out = raw * ratio
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out * update


def occlusion_mask(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """Rectangular holes covering about 30% of each image, one of them on the border."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, 1, size, size)
    for i in range(batch):
        top, left = torch.randint(0, size // 2, (2,), generator=g).tolist()
        mask[i, :, top : top + size // 2, left : left + size // 3] = 0
        mask[i, :, size - size // 5 :, : size // 2] = 0
    return mask.to(device)


def build_models(variants: list[str], holes: list[str], device: torch.device, channels_last: bool) -> dict:
    models = {}
    for name in variants + [NVIDIA_STYLE] + holes:
        torch.manual_seed(0)
        model = torchvision.models.resnet50()
        variant, options = HOLES.get(name, ("partial" if name == NVIDIA_STYLE else name, {}))
        convs.convert(model, variant, **options)
        if name in HOLES:
            model = convs.Masked(model)
        if name == NVIDIA_STYLE:
            for layer in model.modules():
                if isinstance(layer, convs.PartialConv2d):
                    layer.__class__ = NvidiaStylePartialConv2d
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        models[name] = model.train()
    return models


def train_step(model: nn.Module, inputs: tuple, amp: bool) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with torch.autocast(inputs[0].device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(*inputs).float().mean()
        loss.backward()
        return loss

    return step


def forward_only(model: nn.Module, inputs: tuple, amp: bool) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        with torch.autocast(inputs[0].device.type, dtype=torch.bfloat16, enabled=amp):
            return model(*inputs).float().mean()

    return step


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m benchmarks.convs", description=__doc__)
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 8 on CPU, 64 on GPU)")
    parser.add_argument("--size", type=int, default=224, help="input height and width in pixels (default 224)")
    parser.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--variants", nargs="+", default=sorted(convs.VARIANTS), help="variants to measure")
    parser.add_argument(
        "--holes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure masked (hole) runs through convs.Masked (default: on)",
    )
    add_gpu_format_options(parser)
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the training loop does
    variants = with_baseline(args.variants)
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (64 if gpu else 8)
    amp, channels_last = gpu_formats(args, device)

    holes = list(HOLES) if args.holes else []
    models = build_models(variants, holes, device, channels_last)
    x = torch.randn(batch, 3, args.size, args.size, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mask = occlusion_mask(batch, args.size, device)
    inputs = {name: (x, mask) if name in HOLES else (x,) for name in models}
    steps = {name: train_step(model, inputs[name], amp) for name, model in models.items()}
    times = interleaved(steps, rounds=args.rounds, warmup=args.warmup, device=device)

    memory, saved = {}, {}
    for name, model in models.items():
        # What autograd keeps for backward, parameters not counted (a layer saves its weights, which exist anyway).
        saved[name] = saved_activation_bytes(forward_only(model, inputs[name], amp), exclude=model.parameters())
        if gpu:
            memory[name] = peak_cuda_bytes(steps[name], device)
        else:  # CPU allocations are not tracked by torch: saved activations plus params and grads
            params = sum(p.numel() * p.element_size() for p in model.parameters())
            memory[name] = saved[name] + 2 * params
        model.zero_grad(set_to_none=True)

    base_t, base_m, base_s = median(times["zero"]), memory["zero"], saved["zero"]
    rows, goals = [], []
    for name, model in models.items():
        t = median(times[name])
        target, saved_target = TIME_TARGETS.get(name), SAVED_TARGETS.get(name)
        rows.append(
            [
                name,
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}",
                f"{t * 1e3:.0f}",
                f"{batch / t:.0f}",
                f"{t / base_t:.2f}x",
                verdict(t / base_t, target) if target else "",
                f"{memory[name] / 2**20:.0f}",
                f"{memory[name] / base_m:.2f}x",
                f"{saved[name] / 2**20:.0f}",
                f"{saved[name] / base_s:.2f}x",
                verdict(saved[name] / base_s, saved_target) if saved_target else "",
            ]
        )
        if target:
            goals.append(f"{name}: forward+backward time {t / base_t:.2f}x zero ({verdict(t / base_t, target)})")
        if saved_target:
            ratio = saved[name] / base_s
            goals.append(f"{name}: saved for backward {ratio:.2f}x zero ({verdict(ratio, saved_target)})")
    mem_kind = "peak MiB" if gpu else "act+param+grad MiB"
    print(
        f"\nResNet50 forward+backward, batch {batch} x 3 x {args.size} x {args.size}, amp={amp}, "
        f"channels_last={channels_last}, {args.rounds} interleaved rounds (median)"
    )
    print(f"device: {describe(device)}\n")
    header = ["variant", "params (M)", "step ms", "images/s", "time", "target", mem_kind, "memory", "saved MiB"]
    header += ["saved", "target"]
    print(table(header, rows))
    if goals:
        print("\nGoals, against zero padding measured in the same run:\n" + "\n".join(f"- {g}" for g in goals))


if __name__ == "__main__":
    main()
