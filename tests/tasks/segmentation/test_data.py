"""Cityscapes data: the layout check, label ids -> train ids, the loaders, the joint training transform (with
NVIDIA's class-uniform crops, colour jitter and blur)."""

import random
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import tv_tensors

from tasks import LayoutError
from tasks.common import IMAGENET_MEAN, IMAGENET_STD
from tasks.segmentation import IGNORE, TRAIN_CLASSES, ClassUniformCrop, JointTransform, to_train_ids

# docs/datasets.md, written out independently of torchvision's class table.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


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
    assert type(images) is torch.Tensor and type(labels) is torch.Tensor  # plain tensors, no tv_tensors leak out


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


def _encoded_pair():
    """A 24 x 48 labelIds image and an RGB image whose pixel value encodes the label (value = id * 9)."""
    rng = np.random.default_rng(0)
    ids = rng.choice([7, 8, 11, 26], size=(24, 48)).astype(np.uint8)
    return Image.fromarray(np.repeat(ids[..., None] * 9, 3, axis=2)), ids


def _decode(x):
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((x * std + mean) * 255).round().long()[0] // 9


def test_training_transform_keeps_image_and_labels_aligned():
    """Random crop, padding and flip move image and labels together; padding is label 255; scaling keeps ids."""
    image, ids = _encoded_pair()
    for seed in range(8):
        random.seed(seed)
        x, y = JointTransform(32, (1.0, 1.0), train=True)(image, Image.fromarray(ids))
        assert x.shape == (3, 24, 32) and y.shape == (24, 32)  # the crop is clipped to the image height
        raw = _decode(x)
        assert torch.equal(to_train_ids(raw), y)
        random.seed(seed)
        x, y = JointTransform(32, (0.5, 0.5), train=True)(image, Image.fromarray(ids))  # 12 x 24: padded to 24 x 32
        assert x.shape == (3, 24, 32) and (y[12:] == IGNORE).all() and (x[:, 12:] == 0).all()
        assert (y[:12] != IGNORE).sum() == 12 * 24 and set(y.unique().tolist()) <= {0, 1, 2, 13, IGNORE}


def test_training_transform_draws_from_torch_and_covers_crops_and_flips():
    """v2 draws from torch's RNG (seeded per DataLoader worker): same seed, same sample; over seeds, both flips
    and many crop offsets occur, and every crop is a window of the (possibly flipped) image."""
    image, ids = _encoded_pair()
    transform = JointTransform(16, (1.0, 1.0), train=True)
    torch.manual_seed(3)
    first = transform(image, Image.fromarray(ids))
    torch.manual_seed(3)
    again = transform(image, Image.fromarray(ids))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    full = to_train_ids(torch.from_numpy(ids))
    placements = set()
    for seed in range(40):
        torch.manual_seed(seed)
        x, y = transform(image, Image.fromarray(ids))
        assert x.shape == (3, 16, 16) and torch.equal(to_train_ids(_decode(x)), y)
        hits = {
            (flip, top, left)
            for flip, source in ((False, full), (True, full.flip(-1)))
            for top in range(24 - 16 + 1)
            for left in range(48 - 16 + 1)
            if torch.equal(source[top : top + 16, left : left + 16], y)
        }
        assert hits, "every training sample is a window of the image or of its mirror"
        placements |= hits
    assert {flip for flip, _, _ in placements} == {False, True} and len(placements) > 10


@pytest.mark.parametrize("scale_range", [(0.5, 2.0), (0.25, 0.25), (1.5, 1.5)])
def test_training_transform_scales_then_crops_to_the_crop_size(scale_range):
    image, ids = _encoded_pair()
    transform = JointTransform(16, scale_range, train=True)
    for seed in range(10):
        torch.manual_seed(seed)
        x, y = transform(image, Image.fromarray(ids))
        assert x.shape == (3, 16, 16) and y.shape == (16, 16) and y.dtype == torch.long
        assert set(y.unique().tolist()) <= {0, 1, 2, 13, IGNORE}  # nearest-neighbour labels: no blended ids
        assert torch.equal(y == IGNORE, (x == 0).all(0))  # padding, and only padding: label 255 and pixel 0
        if scale_range == (0.25, 0.25):  # 6 x 12: padded right and bottom (the right is the left once flipped)
            left = 0 if (y[:6, :12] != IGNORE).all() else 4
            assert (y[6:] == IGNORE).all() and (y[:6, left : left + 12] != IGNORE).all()
            assert (y[:6] != IGNORE).sum() == 6 * 12


def test_validation_transform_keeps_the_whole_image():
    image, ids = _encoded_pair()
    x, y = JointTransform(16, (0.5, 2.0), train=False)(image, Image.fromarray(ids))
    assert x.shape == (3, 24, 48) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.equal(y, to_train_ids(torch.from_numpy(ids))) and torch.equal(to_train_ids(_decode(x)), y)


def _rare_class_pair():
    """A 48 x 96 scene of road (id 7) with one pixel of a rare class (car, id 26) in a corner, sky (23) on top."""
    ids = np.full((48, 96), 7, np.uint8)
    ids[:12] = 23
    ids[46, 1] = 26
    rgb = np.repeat(ids[..., None] * 9, 3, axis=2)
    return Image.fromarray(rgb), ids


def test_class_uniform_crop_always_holds_a_pixel_of_the_class_it_drew():
    """With class_uniform=1 each crop is centred on a pixel of a class drawn uniformly from the image's classes
    (moved inside the image at the border): of road, sky and a one-pixel car in a corner, the car is drawn in
    about a third of the crops, where plain random crops almost never hold it (4 of 2673 windows do)."""
    image, ids = _encoded_pair()
    crop = ClassUniformCrop((16, 16), 1.0)
    labels = tv_tensors.Mask(to_train_ids(torch.from_numpy(ids)))
    pixels = tv_tensors.Image(torch.rand(3, 24, 48))
    for seed in range(50):
        torch.manual_seed(seed)
        params = crop.make_params([pixels, labels])
        window = crop.transform(labels, params)
        assert params["label"] in {0, 1, 2, 13} and (window == params["label"]).any()
        assert window.shape == (16, 16) and crop.transform(pixels, params).shape == (3, 16, 16)
    image, ids = _rare_class_pair()
    car = TRAIN_CLASSES.index("car")
    found = {}
    for fraction in (1.0, 0.0):
        transform = JointTransform(16, (1.0, 1.0), train=True, class_uniform=fraction)
        hits = 0
        for seed in range(300):
            torch.manual_seed(seed)
            _, y = transform(image, Image.fromarray(ids))
            assert y.shape == (16, 16)
            hits += bool((y == car).any())
        found[fraction] = hits / 300
    assert 0.25 < found[1.0] < 0.42 and found[0.0] < 0.05, found


def test_class_uniform_crop_without_labelled_pixels_or_labels():
    crop = ClassUniformCrop((4, 4), 1.0)
    pixels = tv_tensors.Image(torch.rand(3, 8, 8))
    ignored = tv_tensors.Mask(torch.full((8, 8), IGNORE))
    assert crop.make_params([pixels, ignored])["label"] is None  # nothing to centre on: a random window
    with pytest.raises(TypeError, match="needs the label map"):
        crop.make_params([pixels])
    with pytest.raises(ValueError, match="crop 4 x 4 is larger than the 2 x 8 input"):
        crop.make_params([tv_tensors.Image(torch.rand(3, 2, 8))])


@pytest.mark.parametrize("options", [{"color_jitter": 0.25}, {"gaussian_blur": True}])
def test_colour_jitter_and_blur_change_the_image_never_the_labels(options):
    """Photometric steps act on the image only: against the same crop and flip without them (same seed), the
    labels are identical and the image differs; padding keeps label 255."""
    image, ids = _encoded_pair()
    plain = JointTransform(16, (0.5, 2.0), train=True)
    changed = JointTransform(16, (0.5, 2.0), train=True, **options)
    differs = 0
    for seed in range(10):
        torch.manual_seed(seed)
        x0, y0 = plain(image, Image.fromarray(ids))
        torch.manual_seed(seed)
        x1, y1 = changed(image, Image.fromarray(ids))
        assert torch.equal(y0, y1) and x1.shape == x0.shape == (3, 16, 16)
        differs += not torch.allclose(x0, x1)
    assert differs >= 8


def test_the_loader_takes_the_nvidia_augmentations_from_the_preset(task, root):
    preset = task.presets["smoke"].updated(class_uniform=0.5, color_jitter=0.25, gaussian_blur=True, image_size=16)
    train, _ = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=0)
    transform = train.dataset.dataset.transforms  # the training set, read through SeededItems
    assert (transform.class_uniform, transform.color_jitter, transform.gaussian_blur) == (0.5, 0.25, True)
    images, labels = next(iter(train))
    assert images.shape == (preset.batch_size, 3, 16, 16) and labels.shape == (preset.batch_size, 16, 16)
    steps = [type(step).__name__ for step in transform.augmentation(32, 64).transforms]
    assert steps == ["ClassUniformCrop", "RandomHorizontalFlip", "ToDtype", "ColorJitter", "GaussianBlur"]
