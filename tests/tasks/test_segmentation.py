"""The segmentation task: Cityscapes layout read by the real loaders, mIoU, tiled evaluation, DeepLabV3+."""

import math
import random
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

import convs
from tasks import LayoutError, ensure_synthetic, get_task
from tasks.classification import IMAGENET_MEAN, IMAGENET_STD
from tasks.segmentation import (
    IGNORE,
    TRAIN_CLASSES,
    DeepLabV3Plus,
    JointTransform,
    confusion_matrix,
    iou_per_class,
    mean_iou,
    overlap_stride,
    predict_tiled,
    to_train_ids,
    window_starts,
)

# FORMATS.md, written out independently of torchvision's class table.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


@pytest.fixture(scope="module")
def task():
    return get_task("segmentation")


@pytest.fixture(scope="module")
def root(task, tmp_path_factory):
    return ensure_synthetic(task, task.presets["smoke"], tmp_path_factory.mktemp("cache"))


def test_layout_and_names_look_like_cityscapes(root):
    images = sorted((root / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))
    assert {p.parent.name for p in images} == {"aachen", "bochum"}
    assert {p.parent.name for p in (root / "leftImg8bit" / "val").glob("*/*.png")} == {"frankfurt"}
    for image in images:
        city, seq, frame, suffix = image.name.split("_")
        assert city == image.parent.name and len(seq) == 6 and len(frame) == 6 and suffix == "leftImg8bit.png"
        stem = image.name.removesuffix("_leftImg8bit.png")
        for kind in ("labelIds.png", "color.png", "instanceIds.png", "polygons.json"):
            assert (root / "gtFine" / "train" / city / f"{stem}_gtFine_{kind}").is_file()
        width, height = Image.open(image).size
        assert width == 2 * height  # 2:1 like Cityscapes' 2048 x 1024
    label = np.array(Image.open(root / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png"))
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {1, 7, 8, 11, 21, 23, 26, 28}


def test_read_by_torchvision_cityscapes_and_the_task_loader(task, root):
    raw = torchvision.datasets.Cityscapes(str(root), split="val", mode="fine", target_type="semantic")
    assert len(raw) == 24
    image, target = raw[0]
    assert image.mode == "RGB" and np.array(target).max() <= 33
    preset = task.presets["smoke"]
    train, val = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=0)
    images, labels = next(iter(train))
    assert images.shape == (preset.batch_size, 3, 32, 64) and labels.shape == (preset.batch_size, 32, 64)
    assert labels.dtype == torch.long and set(labels.unique().tolist()) <= {*range(19), IGNORE}
    assert (labels == IGNORE).any()  # the ego vehicle is ignored, as in Cityscapes
    # the loader's labels are the raw label ids mapped to train ids, pixel for pixel (files in sorted order)
    images, labels = next(iter(val))
    first = sorted(zip(raw.images, raw.targets, strict=True))[0]
    raw_ids = np.array(Image.open(first[1][0]))
    expected = torch.tensor([[CITYSCAPES_TRAIN_IDS.get(int(v), IGNORE) for v in row] for row in raw_ids])
    assert torch.equal(labels[0], expected)


def test_label_ids_map_to_exactly_the_19_train_ids():
    ids = torch.arange(256)
    mapped = to_train_ids(ids)
    for raw_id in range(256):
        assert mapped[raw_id].item() == CITYSCAPES_TRAIN_IDS.get(raw_id, IGNORE)
    assert sorted(set(mapped.tolist()) - {IGNORE}) == list(range(19))
    assert len(TRAIN_CLASSES) == 19 and TRAIN_CLASSES[0] == "road" and TRAIN_CLASSES[18] == "bicycle"


def test_wrong_root_shows_the_expected_layout(task, root, tmp_path):
    with pytest.raises(LayoutError, match=r"leftImg8bit/\{train,val\}/<city>"):
        task.check_layout(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    shutil.rmtree(broken / "gtFine" / "val")
    with pytest.raises(LayoutError, match="has no label file"):
        task.check_layout(broken)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_agrees_with_torchmetrics(seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 19, (3, 40, 50), generator=g)
    target[:, :5] = IGNORE
    target[target == 7] = 3  # class 7 absent from the targets
    pred = torch.randint(0, 19, (3, 40, 50), generator=g)
    pred[pred == 11] = 12  # class 11 never predicted
    pred[target == 5] = 5  # some agreement
    confusion = confusion_matrix(pred, target)
    assert confusion.sum() == (target != IGNORE).sum()
    reference = MulticlassJaccardIndex(num_classes=19, ignore_index=IGNORE, average="none", zero_division=math.nan)
    expected = reference(pred, target)
    ours = iou_per_class(confusion).float()
    assert torch.allclose(ours.nan_to_num(-1), expected.nan_to_num(-1), atol=1e-6)
    assert mean_iou(confusion) == pytest.approx(100 * expected[~expected.isnan()].mean().item(), abs=1e-4)


def test_a_class_neither_present_nor_predicted_is_ignored():
    confusion = torch.zeros(19, 19, dtype=torch.long)
    confusion[0, 0], confusion[1, 1], confusion[1, 0] = 10, 5, 5
    iou = iou_per_class(confusion)
    assert iou[2:].isnan().all()
    assert mean_iou(confusion) == pytest.approx(100 * (10 / 15 + 5 / 10) / 2)


@pytest.mark.parametrize("length,tile", [(100, 32), (64, 64), (65, 64), (1000, 333), (2048, 1024), (7, 3)])
def test_windows_cover_every_pixel_and_stay_inside(length, tile):
    for stride in (tile, overlap_stride(tile)):
        starts = window_starts(length, tile, stride)
        assert starts[0] == 0 and starts[-1] == length - tile  # the last window is clamped to the edge
        covered = np.zeros(length, bool)
        for s in starts:
            assert 0 <= s <= length - tile
            covered[s : s + tile] = True
        assert covered.all()
    assert window_starts(2048, 1024, overlap_stride(1024)) == [0, 683, 1024]  # stride = ceil(2/3 * 1024)
    with pytest.raises(ValueError, match="tile <= length"):
        window_starts(10, 11, 5)


def test_tiles_change_nothing_for_a_model_without_padding_effects():
    """1x1 convolutions are translation-equivariant with no border: the three modes give the same prediction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 19, 1)).eval()
    images = torch.randn(2, 3, 37, 90)  # not multiples of the tile
    with torch.no_grad():
        whole = model(images).softmax(1)
        tiles = predict_tiled(model, images, 37, 37)
        overlap = predict_tiled(model, images, 37, overlap_stride(37))
    assert torch.allclose(whole, tiles, atol=1e-6) and torch.allclose(whole, overlap, atol=1e-6)
    assert torch.equal(whole.argmax(1), overlap.argmax(1))
    # a padded 3x3 convolution does see the tile borders: the control that the test can fail
    padded = nn.Conv2d(3, 19, 3, padding=1).eval()
    with torch.no_grad():
        assert not torch.allclose(padded(images).softmax(1), predict_tiled(padded, images, 37, 37), atol=1e-4)


def test_evaluate_reports_the_three_modes_and_per_class_iou(task, root):
    preset = task.presets["smoke"]
    _, val = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=0)
    torch.manual_seed(0)
    model = task.build_model(preset, num_classes=19)
    result = task.evaluate(model, val, torch.device("cpu"), preset)
    for key in ("val/miou", "val/miou_tile", "val/miou_tile_overlap", "val/pixel_acc", "val/loss"):
        assert isinstance(result[key], float) and not math.isnan(result[key])
    assert result["confusion"].shape == (19, 19) and result["classes"] == list(TRAIN_CLASSES)
    assert set(result["per_class_iou"]) == {"whole", "tile", "tile_overlap"}
    assert all(len(v) == 19 for v in result["per_class_iou"].values())


@pytest.mark.parametrize("variant", ["zero", "partial", "gated", "edge", "affine"])
def test_every_variant_converts_the_whole_deeplab_including_dilated_aspp(variant):
    model = DeepLabV3Plus("resnet18", output_stride=8, aspp_rates=(3, 6, 9), aspp_channels=32, decoder_channels=32)
    total = sum(type(m) is nn.Conv2d for m in model.modules())
    dilated = [n for n, m in model.named_modules() if type(m) is nn.Conv2d and m.dilation != (1, 1)]
    assert any(n.startswith("aspp") for n in dilated) and any(n.startswith("layer4") for n in dilated)
    if variant != "zero":
        convs.convert(model, variant)
        assert sum(type(m) is nn.Conv2d for m in model.modules()) == 0  # no plain conv left, ASPP included
        assert sum(isinstance(m, convs.get(variant)) for m in model.modules()) == total
    out = model(torch.randn(2, 3, 32, 64))
    assert out.shape == (2, 19, 32, 64)
    out.mean().backward()


def test_deeplab_output_stride_and_wide_backbone():
    model = DeepLabV3Plus("wide_resnet50_2", output_stride=16, aspp_channels=32, decoder_channels=32)
    features = model.layer4(model.layer3(model.layer2(model.layer1(model.stem(torch.randn(1, 3, 64, 64))))))
    assert features.shape[-2:] == (4, 4) and features.shape[1] == 2048
    with pytest.raises(ValueError, match="torchvision ResNet"):
        DeepLabV3Plus("vgg16")
    with pytest.raises(ValueError, match="output_stride"):
        DeepLabV3Plus("resnet18", output_stride=4)


def test_training_transform_keeps_image_and_labels_aligned():
    """Random crop, padding and flip move image and labels together; padding is label 255; scaling keeps ids."""
    rng = np.random.default_rng(0)
    ids = rng.choice([7, 8, 11, 26], size=(24, 48)).astype(np.uint8)
    image = Image.fromarray(np.repeat(ids[..., None] * 9, 3, axis=2))  # the pixel value encodes the label
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for seed in range(8):
        random.seed(seed)
        x, y = JointTransform(32, (1.0, 1.0), train=True)(image, Image.fromarray(ids))
        assert x.shape == (3, 24, 32) and y.shape == (24, 32)  # the crop is clipped to the image height
        raw = ((x * std + mean) * 255).round().long()[0] // 9
        assert torch.equal(to_train_ids(raw), y)
        random.seed(seed)
        x, y = JointTransform(32, (0.5, 0.5), train=True)(image, Image.fromarray(ids))  # 12 x 24: padded to 24 x 32
        assert x.shape == (3, 24, 32) and (y[12:] == IGNORE).all() and (x[:, 12:] == 0).all()
        assert (y[:12] != IGNORE).sum() == 12 * 24 and set(y.unique().tolist()) <= {0, 1, 2, 13, IGNORE}
