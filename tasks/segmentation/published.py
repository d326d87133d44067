"""Published Cityscapes numbers (mIoU %, DeepLabV3+ with WideResNet38): the thesis' tables 4.3 and 4.4.

Restated with their sources in docs/published.md (a test keeps both equal)."""

from __future__ import annotations

from ..published import Published

TABLE_43 = "thesis Table 4.3: Cityscapes val, WideResNet38 DeepLabV3+, 2 runs x 175 epochs, whole images"
TABLE_44 = "thesis Table 4.4: Cityscapes val, WideResNet38 DeepLabV3+, the best run (whole / tiles / tiles overlap)"
PAPER_44 = "partial-padding paper via thesis Table 4.4: Cityscapes val, WideResNet38 DeepLabV3+, best run"

# The thesis' gated arm here is eq. 3.12: BatchNorm and activation outside the layer, this project's plain `gated`.
PUBLISHED = (
    Published.from_runs("zero", "WN38_zero", TABLE_43, {"best/miou": (73.011, 72.692)}, {"best/miou": 72.852}),
    Published.from_runs("partial", "WN38_partial", TABLE_43, {"best/miou": (72.529, 72.741)}, {"best/miou": 72.635}),
    Published.from_runs(
        "gated", "WN38_gated (eq. 3.12)", TABLE_43, {"best/miou": (73.171, 72.922)}, {"best/miou": 73.047}
    ),
    *(
        Published(arm, label, source, {"best/miou": whole, "best/miou_tile": tile, "best/miou_tile_overlap": overlap})
        for arm, label, source, whole, tile, overlap in (
            ("zero", "WN38_zero*", PAPER_44, 79.069, 79.530, 79.705),
            ("partial", "WN38_partial*", PAPER_44, 79.082, 79.907, 80.079),
            ("zero", "WN38_zero", TABLE_44, 73.011, 73.227, 73.484),
            ("partial", "WN38_partial", TABLE_44, 72.742, 72.92, 73.111),
            ("gated", "WN38_gated (eq. 3.12)", TABLE_44, 73.171, 73.230, 73.462),
        )
    ),
)
