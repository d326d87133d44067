"""Cityscapes semantic segmentation (the thesis' DeepLabV3+ recipe): mIoU on whole images, tiles, overlapping tiles."""

from .data import (
    ID_TO_TRAIN,
    IGNORE,
    LAYOUT,
    PAD_FILL,
    TRAIN_CLASSES,
    ClassUniformCrop,
    JointTransform,
    PadIfSmaller,
    RandomScale,
    build_dataset,
    check_layout,
    to_train_ids,
)
from .metrics import (
    EVAL_MODES,
    confusion_matrix,
    evaluate,
    iou_per_class,
    mean_iou,
    overlap_stride,
    predict_tiled,
    window_starts,
)
from .model import DeepLabV3Plus, build_backbone, dilate_basic_blocks
from .presets import PRESETS, SegmentationPreset
from .synthetic import street_scene, write_synthetic
from .task import SegmentationTask

__all__ = [
    "EVAL_MODES",
    "ID_TO_TRAIN",
    "IGNORE",
    "LAYOUT",
    "PAD_FILL",
    "PRESETS",
    "TRAIN_CLASSES",
    "ClassUniformCrop",
    "DeepLabV3Plus",
    "JointTransform",
    "PadIfSmaller",
    "RandomScale",
    "SegmentationPreset",
    "SegmentationTask",
    "build_backbone",
    "build_dataset",
    "check_layout",
    "confusion_matrix",
    "dilate_basic_blocks",
    "evaluate",
    "iou_per_class",
    "mean_iou",
    "overlap_stride",
    "predict_tiled",
    "street_scene",
    "to_train_ids",
    "window_starts",
    "write_synthetic",
]
