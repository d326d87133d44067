"""The README figure is made by the project: its script must run and write a picture."""

from PIL import Image

from docs import mask_flow


def test_mask_flow_figure(tmp_path):
    out = mask_flow.main(["--out", str(tmp_path / "flow.png"), "--size", "96"])
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 3 * image.height
