"""Published ImageNet numbers (top-1 %, ResNet50): the thesis' tables 4.1 and 4.2 and NVIDIA's partial-padding runs.

Restated with their sources in docs/published.md (a test keeps both equal)."""

from __future__ import annotations

from ..published import Published

THESIS = "thesis Tables 4.1/4.2: ImageNet val, ResNet50, 3 runs x 100 epochs, batch 64"
NVIDIA = "NVIDIA partialconv README: ImageNet val, ResNet50, 5 runs x 100 epochs, batch 192 (best top-1 only)"

# (arm of this project, the thesis' row, best top-1 per run and mean (Table 4.1), the mean of the last 5 epochs per
# run and mean (Table 4.2))
_THESIS = (
    ("zero", "Zero", (75.614, 75.668, 75.884), 75.722, (75.525, 75.569, 75.652), 75.582),
    ("partial", "Partial", (76.148, 75.908, 76.138), 76.065, (76.036, 75.845, 76.006), 75.963),
    ("gated:norm=inside", "Gated (eq. 3.11)", (75.088, 74.838, 74.630), 74.852, (74.941, 74.772, 74.530), 74.748),
    ("edge", "Edge", (75.046, 74.458, 75.034), 74.846, (74.954, 74.379, 74.899), 74.744),
    ("edge_no7", "Edge_no7", (75.090, 74.554, 74.856), 74.833, (74.936, 74.462, 74.826), 74.741),
)

PUBLISHED = (
    *(
        Published.from_runs(
            arm, label, THESIS, {"best/top1": best, "last5/top1": last5}, {"best/top1": mean, "last5/top1": mean5}
        )
        for arm, label, best, mean, last5, mean5 in _THESIS
    ),
    Published.from_runs(
        "zero", "Zero", NVIDIA, {"best/top1": (76.240, 76.074, 75.988, 76.136, 76.224)}, {"best/top1": 76.132}
    ),
    Published.from_runs(
        "partial", "Partial", NVIDIA, {"best/top1": (76.606, 76.532, 76.638, 76.562, 76.716)}, {"best/top1": 76.611}
    ),
)
