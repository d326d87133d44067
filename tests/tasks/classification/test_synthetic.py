"""The classification stand-in: real ImageNet layout and names, labels decided by the image border."""

import numpy as np
import torch
from PIL import Image

from tasks.classification import SYNTHETIC_CLASSES


def test_layout_and_names_look_like_imagenet(root):
    wnids = sorted(SYNTHETIC_CLASSES)
    for split in ("train", "val"):
        assert sorted(p.name for p in (root / split).iterdir()) == wnids
    train_name = next((root / "train" / wnids[0]).iterdir()).name
    val_name = next((root / "val" / wnids[0]).iterdir()).name
    assert train_name.startswith(f"{wnids[0]}_") and train_name.endswith(".JPEG")
    assert val_name.startswith("ILSVRC2012_val_") and len(val_name) == len("ILSVRC2012_val_00000001.JPEG")


def test_labels_depend_on_the_border(root):
    """Class 'touches the top border' has bright pixels in its top row; 'touches no border' does not."""

    def border_brightness(wnid):
        values = []
        for path in sorted((root / "train" / wnid).iterdir())[:10]:
            image = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32))
            values.append(image[0].max(dim=-1).values.mean().item())
        return sum(values) / len(values)

    wnids = sorted(SYNTHETIC_CLASSES)
    assert border_brightness(wnids[0]) > border_brightness(wnids[3]) + 20
