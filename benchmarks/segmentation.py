"""DeepLabV3+ per conv variant: training images per second relative to zero padding, and the wall time of the
three evaluation modes (whole image, tiles, tiles with 1/3 overlap) relative to the whole-image mode.

    python -m benchmarks.segmentation [--device auto|cpu|cuda] [--preset cpu|thesis] [--batch N]
                                      [--eval-batch N] [--height PX] [--rounds N] [--variants NAME...]

The model is the segmentation task's own (`--preset cpu`: layer1-2 of a ResNet18, small heads; `--preset thesis`:
wide_resnet50_2, output stride 8, the default on a GPU). Training: one step (forward, loss, backward, update
with the preset's optimizer, as the sweep builds it) on a batch of 2:1 images, all variants interleaved
round-robin so machine noise hits them alike; medians. Evaluation: `task.evaluate`'s code paths on a batch of
the preset's `eval_batch_size` 2:1 images (what the evaluation feeds the model: 8 in `cpu`, 1 in `thesis`) with
square tiles of the image height, as Cityscapes' 1024 x 2048 images with 1024 x 1024 tiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import convs
from benchmarks.common import describe, interleaved, median, pick_device, table, verdict, with_baseline
from orchestrator.cli import ArgumentParser, CliError
from orchestrator.loop import build_optimizer, keep_freed_memory
from tasks import autocast, get_task
from tasks.segmentation import overlap_stride, predict_tiled

# Targets: training throughput relative to zero padding, measured in the same run.
THROUGHPUT_TARGETS = {"edge": 0.7}
# Targets: evaluation time of each tiled mode relative to the whole image, for every variant (tiles cover the image's
# pixels once, overlapping tiles about 1.5 times).
TILE_TARGETS = {"tiles": 1.15, "tiles, 1/3 overlap": 1.65}


def build(variant: str, preset, device: torch.device, channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_task("segmentation").build_model(preset, num_classes=19)
    convs.convert(model, variant)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m benchmarks.segmentation", description=__doc__)
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    parser.add_argument(
        "--preset", default=None, help="model of this segmentation preset (default: thesis on GPU, cpu)"
    )
    parser.add_argument("--batch", type=int, default=None, help="training batch size (default 8 on CPU, 4 on GPU)")
    parser.add_argument(
        "--eval-batch", type=int, default=None, help="images per evaluation batch (default: the preset's)"
    )
    parser.add_argument(
        "--height", type=int, default=None, help="image height; width is twice (default 64 CPU, 512 GPU)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--variants", nargs="+", default=sorted(convs.VARIANTS), help="variants to measure")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the training loop does
    variants = with_baseline(args.variants)
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    task = get_task("segmentation")
    preset_name = args.preset or ("thesis" if gpu else "cpu")
    if preset_name not in task.presets:
        raise CliError(f"unknown preset {preset_name!r}; choose from {', '.join(task.presets)}")
    preset = task.presets[preset_name]
    eval_batch = preset.eval_batch_size if args.eval_batch is None else args.eval_batch
    if eval_batch < 1:
        raise CliError(f"--eval-batch must be at least 1, got {eval_batch}")
    batch, height = args.batch or (4 if gpu else 8), args.height or (512 if gpu else 64)
    amp = "bf16" if gpu else None  # the benchmark's own setting, not the preset's: bf16 on GPUs, fp32 on CPUs

    models = {v: build(v, preset, device, gpu) for v in variants}
    optimizers = {v: build_optimizer(m, preset) for v, m in models.items()}  # the sweep's own: Adam in `cpu`
    x = torch.randn(batch, 3, height, 2 * height, device=device)
    y = torch.randint(0, 19, (batch, height, 2 * height), device=device)

    def train_step(variant: str):
        model, optimizer = models[variant].train(), optimizers[variant]

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, amp):
                loss = F.cross_entropy(model(x).float(), y, ignore_index=255)
            loss.backward()
            optimizer.step()

        return step

    train_times = interleaved(
        {v: train_step(v) for v in variants}, rounds=args.rounds, warmup=args.warmup, device=device
    )
    base = median(train_times["zero"])
    train_rows, goals = [], []
    for v, t in train_times.items():
        ratio, target = base / median(t), THROUGHPUT_TARGETS.get(v)
        goal = verdict(ratio, target, at_most=False) if target else ""
        train_rows.append([v, f"{batch / median(t):.1f}", f"{ratio:.2f}x", f"{median(t) / base:.2f}x", goal])
        if target:
            goals.append(f"{v}: training throughput {ratio:.2f}x zero ({goal})")

    image = torch.randn(eval_batch, 3, height, 2 * height, device=device)
    tile = height
    modes = {
        "whole image": lambda m: m(image),
        "tiles": lambda m: predict_tiled(m, image, tile, tile),
        "tiles, 1/3 overlap": lambda m: predict_tiled(m, image, tile, overlap_stride(tile)),
    }
    eval_rows, tile_ratios = [], {mode: {} for mode in TILE_TARGETS}
    for v in variants:
        model = models[v].eval()

        def run(mode, model=model):
            @torch.no_grad()
            def step() -> None:
                with autocast(device, amp):
                    modes[mode](model)

            return step

        times = interleaved({mode: run(mode) for mode in modes}, rounds=args.rounds, warmup=args.warmup, device=device)
        whole = median(times["whole image"])
        eval_rows.append([v, *(f"{median(times[m]) * 1e3:.0f} ms ({median(times[m]) / whole:.2f}x)" for m in modes)])
        for mode in TILE_TARGETS:
            tile_ratios[mode][v] = median(times[mode]) / whole

    print(
        f"\nDeepLabV3+ ({preset.model}, preset {preset_name}) training step, batch {batch} x 3 x {height} x "
        f"{2 * height}, {amp or 'fp32'}, {args.rounds} interleaved rounds (median)"
    )
    print(f"device: {describe(device)}\n")
    print(table(["variant", "train images/s", "throughput vs zero", "step time vs zero", "target"], train_rows))
    if goals:
        print("\nGoals, against zero padding measured in the same run:\n" + "\n".join(f"- {g}" for g in goals))
    print(
        f"\nEvaluation of {eval_batch} {height} x {2 * height} image(s) at once, square tiles of {tile} px; time "
        "relative to whole image\n"
    )
    print(table(["variant", *modes], eval_rows))
    worst = {mode: max(ratios.items(), key=lambda item: item[1]) for mode, ratios in tile_ratios.items()}
    print(
        "\nGoals, against the whole image in the same run (the slowest variant):\n"
        + "\n".join(f"- {m}: {r:.2f}x ({v}; {verdict(r, TILE_TARGETS[m])})" for m, (v, r) in worst.items())
    )


if __name__ == "__main__":
    main()
