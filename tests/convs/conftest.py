"""Shared geometries for the conv tests: every layer must handle all of them."""

import pytest
import torch

# (in, out, kernel, stride, padding, dilation, groups): strided, dilated, grouped, depthwise, rectangular,
# 1x1, the 7x7 stem, 'same' with an even kernel (asymmetric padding) and padding wider than the kernel.
GEOMETRIES = {
    "3x3": (4, 6, 3, 1, 1, 1, 1),
    "3x3_stride2": (4, 6, 3, 2, 1, 1, 1),
    "3x3_dilated": (4, 6, 3, 1, 2, 2, 1),
    "3x3_dilated_stride2": (4, 6, 3, 2, 3, 3, 1),
    "grouped": (4, 6, 3, 1, 1, 1, 2),
    "depthwise": (4, 4, 3, 2, 1, 1, 4),
    "rect_5x3": (4, 6, (5, 3), 1, (2, 1), 1, 1),
    "rect_1x7": (4, 6, (1, 7), 1, (0, 3), 1, 1),
    "1x1": (4, 6, 1, 1, 0, 1, 1),
    "1x1_stride2": (4, 6, 1, 2, 0, 1, 1),
    "stem_7x7": (3, 8, 7, 2, 3, 1, 1),
    "same_even_4x4": (4, 6, 4, 1, "same", 1, 1),
    "pad_exceeds_kernel": (4, 6, 3, 1, 3, 1, 1),
}


@pytest.fixture(params=sorted(GEOMETRIES), ids=sorted(GEOMETRIES))
def geometry(request):
    in_c, out_c, k, s, p, d, g = GEOMETRIES[request.param]
    return dict(in_channels=in_c, out_channels=out_c, kernel_size=k, stride=s, padding=p, dilation=d, groups=g)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
