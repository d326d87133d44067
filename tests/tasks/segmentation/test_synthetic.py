"""The segmentation stand-in: real Cityscapes layout and file names, 2:1 images, raw label ids."""

import numpy as np
from PIL import Image


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
