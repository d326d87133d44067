"""The hotel-recognition model: a torchvision classifier whose last layer is replaced by an L2-normalised embedding.

The thesis' network: ResNet50 from scratch (or from the same arm's ImageNet model), its `fc` replaced by a 256-d
linear embedding, normalised to unit length so that retrieval ranks by inner product (= cosine similarity).

`embedding_bn` (the laptop presets; not in the thesis) puts a BatchNorm1d between that linear layer and the
normalisation. From scratch, a ResNet's pooled features are non-negative and share a large common part, so the
embeddings of all images start in a narrow cone (mean pairwise cosine 0.97 measured on the synthetic hotels): every
cosine distance is far below the 0.1 margin, every triplet violates it, the loss sits at the margin and a few
hundred steps learn almost nothing. Centring each embedding dimension over the batch opens the cone at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ..common import load_pretrained
from .presets import HotelsPreset

logger = logging.getLogger(__name__)

HEAD = "fc"  # the classifier head of a torchvision ResNet: replaced by the embedding


class EmbeddingNet(nn.Module):
    """torchvision's `model` (any classifier with a final `fc` Linear: resnet18/34/50, wide_resnet, resnext...),
    untrained, its `fc` replaced by `nn.Linear(in_features, embedding_dim)` (then a BatchNorm1d with `embedding_bn`);
    returns unit-length embeddings.

    The torchvision model stays whole as `self.backbone` (the embedding is `backbone.fc`): its plain nn.Conv2d layers
    and their BatchNorms keep torchvision's structure, so `convs.convert` reaches every conv (and its norm-absorbing
    gated variant finds each BatchNorm after its conv), and its state-dict keys are torchvision's under `backbone.`,
    so an ImageNet classifier's weights load by name (`load_backbone_state`).
    """

    def __init__(self, model: str = "resnet50", embedding_dim: int = 256, *, embedding_bn: bool = False) -> None:
        super().__init__()
        if model not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"Unknown torchvision model {model!r} in the preset")
        backbone = getattr(torchvision.models, model)(weights=None)
        head = getattr(backbone, HEAD, None)
        if not isinstance(head, nn.Linear) or getattr(backbone, "aux_logits", False):
            raise ValueError(
                f"torchvision model {model!r} has no single final `fc` Linear layer (or has auxiliary heads) to "
                "replace by the embedding: use a "
                "ResNet-family model, e.g. resnet18, resnet50, wide_resnet50_2, resnext50_32x4d"
            )
        backbone.fc = nn.Linear(head.in_features, embedding_dim)
        if embedding_bn:  # inside `fc`: the state dict keeps every key under `backbone.`, the head under `fc.`
            backbone.fc = nn.Sequential(backbone.fc, nn.BatchNorm1d(embedding_dim))
        self.backbone = backbone
        self.embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-length embeddings (B, embedding_dim), normalised in fp32 (also under autocast: the explicit cast
        makes the norm and the division fp32, and torch.fx still traces the model, which `convs.convert` needs)."""
        return F.normalize(self.backbone(x).float(), dim=1)


def build_model(preset: HotelsPreset) -> nn.Module:
    """`EmbeddingNet(preset.model, preset.embedding_dim, embedding_bn=preset.embedding_bn)`, untrained (a retrieval
    model has no classes)."""
    return EmbeddingNet(preset.model, preset.embedding_dim, embedding_bn=preset.embedding_bn)


def load_backbone_state(model: EmbeddingNet, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load a torchvision classifier's state dict (an ImageNet checkpoint), or an EmbeddingNet's, into `model`'s
    backbone by name (`tasks.common.load_pretrained`); return the names (as given) of the tensors not loaded.

    Every backbone tensor must be there with its shape, except the head `fc`, which is loaded only when its shape
    matches (an EmbeddingNet of the same width: the whole model loads) and otherwise keeps its fresh init (an
    ImageNet classifier's 1000-way `fc`). A converted model (`convs.convert`) loads a checkpoint of a model
    converted the same way. BatchNorm's `num_batches_tracked` may be absent.

    Raises:
        TypeError: `model` is not an EmbeddingNet.
        ValueError: a backbone tensor (other than the head) absent from `state_dict`, or one of another shape.
    """
    if not isinstance(model, EmbeddingNet):
        raise TypeError(f"load_backbone_state expects an EmbeddingNet, got {type(model).__name__}")
    return load_pretrained(model.backbone, state_dict, optional=(HEAD + ".",))
