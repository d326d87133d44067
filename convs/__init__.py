"""Convolutions that handle invalid pixels (zero padding, holes) and the surgery that puts them in any model."""

from .edge import REGIONS, EdgeConv2d
from .gated import AffineGatedConv2d, GatedConv2d
from .masked import Masked
from .masks import MaskFlow
from .partial import PartialConv2d
from .policy import STARTS, ConvReplacement, ConvSite
from .spec import ALIAS_MEANINGS, ALIASES, VARIANTS, VariantSpec, get, parse_variant
from .surgery import convert

__all__ = [
    "ALIASES",
    "ALIAS_MEANINGS",
    "VARIANTS",
    "REGIONS",
    "STARTS",
    "AffineGatedConv2d",
    "ConvReplacement",
    "ConvSite",
    "EdgeConv2d",
    "GatedConv2d",
    "Masked",
    "MaskFlow",
    "PartialConv2d",
    "VariantSpec",
    "convert",
    "get",
    "parse_variant",
]
