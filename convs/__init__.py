"""Convolutions that handle invalid pixels (zero padding, holes) and the surgery that puts them in any model."""

from .edge import REGIONS, EdgeConv2d
from .gated import GatedConv2d
from .partial import PartialConv2d
from .surgery import VARIANTS, convert, get

__all__ = ["VARIANTS", "REGIONS", "EdgeConv2d", "GatedConv2d", "PartialConv2d", "convert", "get"]
