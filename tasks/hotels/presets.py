"""Hotel-recognition recipes: the thesis' Hotels-50K schedule and laptop-sized ones on the synthetic stand-in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..preset import Choice, Flag, Integer, Interval, Number, Options, Preset, PresetError


@dataclass(frozen=True)
class HotelsPreset(Preset):
    """A hotel-recognition recipe: the shared fields plus the embedding, the triplet loss and its batches, the
    cleaning threshold, training-time occlusion and the retrieval index.

    `batch_size` (the global batch) must equal `hotels_per_batch * images_per_hotel` (the thesis: 13 x 8 = 104).
    """

    embedding_dim: int = 256  # the L2-normalised embedding replacing the classifier
    embedding_bn: bool = False  # a BatchNorm1d before the normalisation (not the thesis'; see tasks/hotels/model.py)
    margin: float = 0.1  # triplet margin (cosine distance on normalised embeddings)
    hotels_per_batch: int = 13  # hotels in each global batch
    images_per_hotel: int = 8  # images of each of those hotels (balanced between the two sources)
    min_images: int = 8  # cleaning: training hotels with fewer images are dropped
    eval_size: int = 256  # evaluation resize (the shorter side) before the centre crop of image_size
    occlusion_prob: float = 1.0  # chance that a training image gets a people-shaped occluder
    occluder_scale: tuple[float, float] = (0.3, 0.7)  # occluder side as a fraction of the image side
    index: str = "flat"  # the retrieval index: flat (exact inner product), ivf or hnsw (approximate)
    index_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"nlist": 4096, "nprobe": 64}, {"m": 32}

    checks: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        **Preset.checks,
        "embedding_dim": Integer(1, example="embedding_dim=256"),
        "embedding_bn": Flag(example="embedding_bn=True"),
        "margin": Number(low=0, low_open=True, example="margin=0.1"),
        "hotels_per_batch": Integer(2, example="hotels_per_batch=13"),
        "images_per_hotel": Integer(2, example="images_per_hotel=8"),
        "min_images": Integer(1, example="min_images=8"),
        "eval_size": Integer(1, example="eval_size=256"),
        "occlusion_prob": Number(low=0, high=1, example="occlusion_prob=1.0, or 0 for no training occlusion"),
        "occluder_scale": Interval(0.0, 1.0, example="occluder_scale=(0.3, 0.7)"),
        "index": Choice(("flat", "ivf", "hnsw"), example='index="ivf"'),
        "index_options": Options(example='index_options={"nlist": 4096, "nprobe": 64}'),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        hotels, images = self.hotels_per_batch, self.images_per_hotel
        if self.batch_size != hotels * images:
            raise PresetError(
                f"Invalid preset value batch_size={self.batch_size!r}: expected hotels_per_batch x images_per_hotel "
                f"= {hotels} x {images} = {hotels * images}, a hotels batch (e.g. batch_size={hotels * images})."
            )
        if self.min_images < images:
            raise PresetError(
                f"Invalid preset value min_images={self.min_images!r}: expected at least images_per_hotel={images}, "
                f"as a batch takes that many images of each hotel (e.g. min_images={images})."
            )


# A laptop-sized comparison: ResNet18 at 64 px on the synthetic hotels, 6 hotels x 4 images per batch. Departs from
# the thesis, for learning in minutes from scratch: Adam lr 1e-3 (not 1e-5), and a BatchNorm1d on the embedding
# (`embedding_bn`): without it the from-scratch embeddings start in a narrow cone where every triplet violates the
# margin, and the loss stayed at the margin for 40 epochs of the smoke data (see tasks/hotels/model.py).
_CPU = HotelsPreset(
    model="resnet18",
    embedding_bn=True,
    epochs=8,
    batch_size=24,
    hotels_per_batch=6,
    images_per_hotel=4,
    min_images=8,
    optimizer="adam",
    lr=1e-3,
    momentum=0.9,
    weight_decay=0.0,
    schedule="constant",
    image_size=64,
    eval_size=72,
    eval_batch_size=64,
    eval_every=2,
    synthetic={"hotels": 48, "chains": 6, "size": 80},
    variants=("zero", "partial_1ch", "partial", "gated:norm=inside", "affine"),
    variant_start="random",
)

PRESETS: dict[str, HotelsPreset] = {
    # The thesis (tables 4.5, 4.6): ResNet50, 256-d embedding, triplet loss (margin 0.1, a random negative among
    # those violating the margin), Adam lr 1e-5 with betas (0.9, 0.999), global batch 104 = 13 hotels x 8 images,
    # 12 epochs from scratch, fp32. Not given by the thesis, taken from the dataset authors' baseline: resize 256,
    # centre crop 224. Its arms: Zero, Partial_1ch, Partial (multi-channel mask), Gated eq. 3.11, plus affine.
    "thesis": HotelsPreset(
        model="resnet50",
        epochs=12,
        batch_size=104,
        optimizer="adam",
        lr=1e-5,
        momentum=0.9,
        weight_decay=0.0,
        schedule="constant",
        image_size=224,
        eval_size=256,
        eval_every=3,  # embedding the million-image gallery costs about as much as a training epoch
        amp=None,
        variants=("zero", "partial_1ch", "partial", "gated:norm=inside", "affine"),
        variant_start="random",
    ),
    "cpu": _CPU,
    # A machinery check on 14 hotels: 3 short epochs, evaluated every epoch, new filters starting as copies, 16
    # test images per hotel and level (224 queries: top-1 moves by about 2 points from one draw to the next).
    "smoke": _CPU.updated(
        epochs=3,
        batch_size=16,
        hotels_per_batch=4,
        images_per_hotel=4,
        min_images=8,
        image_size=48,
        eval_size=56,
        eval_batch_size=32,
        eval_every=1,
        max_batches=None,
        synthetic={"hotels": 16, "chains": 3, "size": 64, "test_images": 16},
        variant_start="copy",
    ),
}
