"""Hotels-50K hotel recognition (the thesis' third task): retrieval under people-shaped occlusions, triplet loss."""

from .data import (
    LAYOUT,
    LEVEL_FOLDERS,
    LEVELS,
    SOURCES,
    EvalImages,
    HotelsIndex,
    TrainImages,
    build_datasets,
    check_layout,
    load_index,
)
from .loss import RandomViolatingNegativeMiner, TripletLoss
from .metrics import CHAIN_K, INSTANCE_K, TOP, RetrievalLoaders, embed, evaluate, search, topk_accuracy
from .model import EmbeddingNet, build_model, load_backbone_state
from .presets import PRESETS, HotelsPreset
from .sampler import SourceBalancedBatchSampler
from .synthetic import write_synthetic
from .task import HotelsTask

__all__ = [
    "CHAIN_K",
    "INSTANCE_K",
    "LAYOUT",
    "LEVELS",
    "LEVEL_FOLDERS",
    "PRESETS",
    "SOURCES",
    "TOP",
    "EmbeddingNet",
    "EvalImages",
    "HotelsIndex",
    "HotelsPreset",
    "HotelsTask",
    "RandomViolatingNegativeMiner",
    "RetrievalLoaders",
    "SourceBalancedBatchSampler",
    "TrainImages",
    "TripletLoss",
    "build_datasets",
    "build_model",
    "check_layout",
    "embed",
    "evaluate",
    "load_backbone_state",
    "load_index",
    "search",
    "topk_accuracy",
    "write_synthetic",
]
