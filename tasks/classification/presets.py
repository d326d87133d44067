"""Classification recipes: the thesis' ImageNet schedule and laptop-sized ones on the synthetic stand-in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..preset import Integer, Interval, Preset


@dataclass(frozen=True)
class ClassificationPreset(Preset):
    """A classification recipe: the shared fields plus the validation resize and the training crop's area range."""

    eval_size: int = 256  # validation resize before the centre crop of image_size
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (synthetic data: keep borders)

    checks: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        **Preset.checks,
        "eval_size": Integer(1, example="eval_size=256"),
        "crop_scale": Interval(0.0, 1.0, example="crop_scale=(0.08, 1.0)"),
    }


# A laptop-sized comparison: a small ResNet at low resolution on the synthetic data (Adam: BatchNorm statistics
# settle within a few hundred steps, where SGD 0.1 from scratch would not).
_CPU = ClassificationPreset(
    model="resnet18",
    epochs=6,
    batch_size=32,
    optimizer="adam",
    lr=1e-3,
    weight_decay=0.0,
    schedule="constant",
    image_size=48,
    eval_size=48,
    crop_scale=(0.7, 1.0),
    synthetic={"train_per_class": 96, "val_per_class": 24, "size": 56},
    variants=("zero", "partial", "gated", "edge", "affine"),
    variant_start="random",  # trained from scratch: a converted layer's new filters start random
)

PRESETS: dict[str, ClassificationPreset] = {
    # NVIDIA/partialconv main.py and the thesis (global batch 64, fp32): 100 epochs, SGD 0.1, x0.1 every 30 epochs.
    # The thesis' arms (tables 4.1, 4.2: gated is eq. 3.11, the BatchNorm inside) plus this project's affine.
    "thesis": ClassificationPreset(
        model="resnet50",
        epochs=100,
        batch_size=64,
        lr=0.1,
        step_size=30,
        gamma=0.1,
        amp=None,
        variants=("zero", "partial", "gated:norm=inside", "edge", "edge_no7", "affine"),
        variant_start="random",
    ),
    "cpu": _CPU,
    # The cpu recipe at 32 px with a few batches per epoch: for tests and a first try.
    "smoke": _CPU.updated(
        epochs=4,
        batch_size=16,
        image_size=32,
        eval_size=32,
        max_batches=8,
        synthetic={"train_per_class": 32, "val_per_class": 16, "size": 36},
        # A machinery check of a few epochs: new filters start as copies (the source's function), so that every
        # variant learns within them; the comparison presets (cpu, thesis) start them random, as the thesis did.
        variant_start="copy",
    ),
}
