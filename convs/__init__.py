"""Convolutions that handle invalid pixels (zero padding, holes) and the surgery that puts them in any model."""

from .edge import REGIONS, EdgeConv2d
from .gated import AffineGatedConv2d, GatedConv2d
from .masked import Masked
from .masks import MaskFlow
from .partial import PartialConv2d
from .policy import ConvReplacement, ConvSite
from .surgery import VARIANTS, convert, get

__all__ = [
    "VARIANTS",
    "REGIONS",
    "AffineGatedConv2d",
    "ConvReplacement",
    "ConvSite",
    "EdgeConv2d",
    "GatedConv2d",
    "Masked",
    "MaskFlow",
    "PartialConv2d",
    "convert",
    "get",
]
