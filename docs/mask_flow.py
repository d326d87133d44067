"""Draw the validity mask at each stage of a partial-conv ResNet50 for one occluded image (README figure).

python -m docs.mask_flow [--out docs/mask_flow.png]
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.cbook
import matplotlib.pyplot as plt
import numpy as np
import torch
import torchvision
from PIL import Image

import convs
from orchestrator.cli import ArgumentParser

STAGES = ["input", "conv1", "layer1", "layer2", "layer3", "layer4"]


def stroke_mask(size: int, *, seed: int = 3) -> torch.Tensor:
    """A free-form occlusion: thick strokes with round joints (DeepFill v2 style) plus a block at the border."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    hole = np.zeros((size, size), bool)
    for _ in range(3):
        y, x = rng.uniform(0.2, 0.8, 2) * size
        width = rng.uniform(0.04, 0.08) * size
        angle = rng.uniform(0, 2 * math.pi)
        for _ in range(int(rng.integers(4, 8))):
            angle += rng.uniform(-0.9, 0.9)
            ny, nx = y + math.sin(angle) * size * 0.12, x + math.cos(angle) * size * 0.12
            for t in np.linspace(0, 1, 20):
                cy, cx = y + (ny - y) * t, x + (nx - x) * t
                hole |= (yy - cy) ** 2 + (xx - cx) ** 2 < width**2
            y, x = np.clip(ny, 0, size - 1), np.clip(nx, 0, size - 1)
    hole[int(0.78 * size) :, : int(0.35 * size)] = True  # an occluder cut by the image border
    return torch.from_numpy(~hole).float()[None, None]


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(prog="python -m docs.mask_flow", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("mask_flow.png"))
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:  # a real photo that ships with matplotlib
        image = Image.open(f).convert("RGB").resize((args.size, args.size))
    x = torchvision.transforms.functional.to_tensor(image)[None]
    mask = stroke_mask(args.size)

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    convs.convert(model, "partial")
    sizes = {"input": (args.size, args.size)}
    for name in STAGES[1:]:
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, o.shape[-2:]))
    with torch.no_grad():
        _, masks = convs.Masked(model)(x, mask, return_masks=True)

    fig, axes = plt.subplots(1, len(STAGES) + 1, figsize=(2.2 * (len(STAGES) + 1), 2.6))
    axes[0].imshow((x[0] * mask[0]).permute(1, 2, 0).numpy())
    axes[0].set_title("occluded image", fontsize=9)
    for ax, name in zip(axes[1:], STAGES, strict=True):
        m = masks[tuple(sizes[name])][0, 0].numpy()
        ax.imshow(m, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name} {m.shape[0]}x{m.shape[1]}\nholes {100 * (1 - m.mean()):.1f}%", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Validity mask at each stage of a partial-conv ResNet50 (white = valid)", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    return args.out


if __name__ == "__main__":
    print(main())
